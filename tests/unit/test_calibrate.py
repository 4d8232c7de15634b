import numpy as np
import pytest
import yaml

from relret import calibrate as cal


def test_beta_regression_recovers_known_constants():
    """On data simulated from the model (logit mu = -a + b h, beta noise), the fit recovers a and b."""
    rng = np.random.default_rng(0)
    h = rng.uniform(-0.2, 1.0, 4000)
    a, b, precision = 2.0, 5.0, 6.0
    mu = 1 / (1 + np.exp(a - b * h))
    y = rng.beta(mu * precision, (1 - mu) * precision)
    fit = cal.fit_beta_regression(h, y)
    assert fit["a"] == pytest.approx(a, abs=4 * fit["a_se"])
    assert fit["b"] == pytest.approx(b, abs=4 * fit["b_se"])
    assert fit["precision"] == pytest.approx(precision, rel=0.15)


def test_squeeze_maps_into_open_interval():
    """(y(n-1)+0.5)/n keeps 0 and 1 strictly inside (0, 1)."""
    y = cal.squeeze(np.array([0.0, 0.5, 1.0, 1.0]))
    assert y.tolist() == pytest.approx([0.125, 0.5, 0.875, 0.875])


def _write_ratings(path, rows, header="split,tid,query_text,query_source_file,fid,file_name,fid_group,rating"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")


def test_own_caption_left_out(tmp_path):
    """h is the mean cosine to the clip's captions, without the query itself on its own clip (hand-computed)."""
    vectors = {"q": [1.0, 0.0], "c1": [0.0, 1.0], "c2": [0.6, 0.8], "d1": [0.8, 0.6], "d2": [1.0, 0.0]}
    ratings = [cal.Rating("s", "q", "A.wav", "A.wav", 90.0), cal.Rating("s", "q", "A.wav", "B.wav", 40.0)]
    captions = {"A.wav": ["c1", "q", "c2"], "B.wav": ["d1", "d2"]}
    h, approx = cal.query_clip_similarity(ratings, captions, lambda texts: np.array([vectors[t] for t in texts]))
    assert h.tolist() == pytest.approx([(0.0 + 0.6) / 2, (0.8 + 1.0) / 2])
    assert approx == 0
    # A query revised since (not verbatim among its clip's captions): the nearest caption is left out, and counted.
    captions["A.wav"] = ["c1", "d2", "c2"]
    h, approx = cal.query_clip_similarity(ratings, captions, lambda texts: np.array([vectors[t] for t in texts]))
    assert h[0] == pytest.approx(0.3) and approx == 1


def test_real_ratings_reproduce_reference_figures(shared_data, tmp_path):
    """On the real evaluation ratings, the paper's constants give Spearman 0.67 and MAE 0.18 (data README)."""
    out = tmp_path / "cal.yaml"
    code = cal.main(
        [
            "--ratings",
            str(shared_data / "relevance_ratings/evaluation_relevances_joined.csv"),
            "--captions",
            str(shared_data / "clotho/clotho_captions_evaluation.csv"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = yaml.safe_load(out.read_text())
    paper = result["quality"]["evaluation"]["paper"]
    assert paper["n"] == 3400
    assert paper["spearman_h_rating"] == pytest.approx(0.67, abs=0.005)
    assert paper["mae"] == pytest.approx(0.18, abs=0.005)
    # The fitted curve is a proper maximum-likelihood fit near the paper's (MiniLM is not the paper's mpnet).
    assert 1.5 < result["a"] < 4.0 and 3.0 < result["b"] < 7.0
    assert result["fit"]["log_likelihood"] > 0
    assert result["sbert"] == "all-MiniLM-L6-v2"
    assert not list(tmp_path.glob(".cal.yaml.tmp*"))


def test_missing_columns_named(tmp_path):
    """A ratings CSV without the needed columns is refused naming them and the file."""
    path = tmp_path / "r.csv"
    _write_ratings(path, ["x,1,q,A.wav"], header="split,tid,query,query_source_file")
    with pytest.raises(ValueError, match=r"r\.csv: ratings CSV lacks column\(s\) query_text, file_name, rating"):
        cal.read_ratings(path)


def test_bad_rating_value_named_with_line(tmp_path):
    """A non-numeric or out-of-range rating is refused with file and line."""
    path = tmp_path / "r.csv"
    _write_ratings(path, ["s,t,q,A.wav,f,A.wav,TP,90", "s,t,q,A.wav,f,B.wav,C15,lots"])
    with pytest.raises(ValueError, match=r"r\.csv:3: rating 'lots' is not a number"):
        cal.read_ratings(path)
    _write_ratings(path, ["s,t,q,A.wav,f,A.wav,TP,190"])
    with pytest.raises(ValueError, match=r"r\.csv:2: rating 190.0 is outside"):
        cal.read_ratings(path)


def test_cli_reports_missing_captions(tmp_path, capsys):
    """Rated clips absent from the captions file fail with a message saying which file to pass."""
    ratings, captions = tmp_path / "r.csv", tmp_path / "c.csv"
    _write_ratings(ratings, ["s,t,q,A.wav,f,A.wav,TP,90"])
    captions.write_text("file_name,caption_1,caption_2\nB.wav,x,y\n")
    code = cal.main(["--ratings", str(ratings), "--captions", str(captions), "--out", str(tmp_path / "o.yaml")])
    assert code == 2
    assert "1 rated clip(s) have no captions" in capsys.readouterr().err
    assert not (tmp_path / "o.yaml").exists()
