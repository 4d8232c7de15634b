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


def _write_captions(path, rows):
    path.write_text("file_name,caption_1,caption_2\n" + "\n".join(rows) + "\n", encoding="utf-8")


def test_captions_looked_up_by_split_and_file_name(tmp_path, monkeypatch):
    """A file name reused by two splits for different clips: each rating gets its own split's captions (hand-computed
    h), whatever order the captions files come in; merging the tables by file name alone gives one split wrong h."""
    vectors = {
        "qd": [1.0, 0.0],  # a development query, a caption of B.wav
        "qv": [0.0, 1.0],  # a validation query, a caption of C.wav
        "a1": [1.0, 0.0],  # development's A.wav
        "a2": [0.6, 0.8],
        "x1": [0.0, 1.0],  # validation's A.wav, another clip under the same name
        "x2": [0.8, 0.6],
        "b2": [0.0, 1.0],
        "c2": [0.8, 0.6],
    }
    _write_captions(tmp_path / "clotho_captions_development.csv", ["A.wav,a1,a2", "B.wav,qd,b2"])
    _write_captions(tmp_path / "clotho_captions_validation.csv", ["A.wav,x1,x2", "C.wav,qv,c2"])
    header = "split,tid,query_text,query_source_file,fid,file_name,fid_group,rating"
    _write_ratings(
        tmp_path / "development_joined.csv",
        ["development,t1,qd,B.wav,f1,A.wav,C15,90", "development,t1,qd,B.wav,f2,B.wav,TP,80"],
        header,
    )
    _write_ratings(
        tmp_path / "validation_joined.csv",
        ["validation,t2,qv,C.wav,f3,A.wav,C15,20", "validation,t2,qv,C.wav,f4,C.wav,TP,70"],
        header,
    )
    seen = []

    def fit(h, y):  # the fit itself is tested elsewhere; this one records the h it is given
        seen.append(np.asarray(h).tolist())
        return {"a": 1.0, "b": 2.0, "a_se": 0.1, "b_se": 0.1, "precision": 3.0, "log_likelihood": 0.0, "n": len(h)}

    monkeypatch.setattr(cal, "fit_beta_regression", fit)
    ratings = [tmp_path / "development_joined.csv", tmp_path / "validation_joined.csv"]
    captions = [tmp_path / "clotho_captions_development.csv", tmp_path / "clotho_captions_validation.csv"]
    for order in (captions, captions[::-1]):
        result = cal.calibrate(ratings, order, embed=lambda texts: np.array([vectors[t] for t in texts]))
        # development: qd.(a1, a2) = (1, 0.6) -> 0.8; qd.b2 = 0. validation: qv.(x1, x2) = (1, 0.6) -> 0.8; qv.c2 = 0.6.
        assert seen.pop() == pytest.approx([0.8, 0.0, 0.8, 0.6])
        assert result["captions"] == {
            "development": [str(captions[0])],
            "validation": [str(captions[1])],
        }
        assert result["queries_matched_to_a_revised_caption"] == 0


def test_caption_files_assigned_to_splits(tmp_path):
    """A captions file belongs to the split its name contains or the one given as SPLIT=PATH; one that names no rated
    split, a split without ratings, and a rated split without captions are refused saying what to pass."""
    splits = ["development", "validation"]
    dev, val, other = (tmp_path / n for n in ("clotho_captions_development.csv", "val.csv", "x=y.csv"))
    assert cal.caption_splits([dev, f"validation={val}"], splits) == {"development": [dev], "validation": [val]}
    other.write_text("")  # an existing file whose name holds "=" is a path, not SPLIT=PATH
    with pytest.raises(ValueError, match=rf"--captions {other}: its name does not say which rated split"):
        cal.caption_splits([dev, other], splits)
    with pytest.raises(ValueError, match=r"pass it as SPLIT=PATH \(e\.g\. development="):
        cal.caption_splits([val], splits)
    with pytest.raises(ValueError, match="no ratings of split 'evaluation' were given"):
        cal.caption_splits([f"evaluation={val}"], splits)
    with pytest.raises(ValueError, match=r"no captions file for the rated split\(s\) validation: .*validation=PATH"):
        cal.caption_splits([dev], splits)
    assert cal.caption_splits([val], ["s"]) == {"s": [val]}  # one rated split takes any file


def test_sbert_by_name_missing_names_install_command(tmp_path, monkeypatch, capsys):
    """`--sbert all-mpnet-base-v2` before it is installed fails at once, naming the install command; nothing written."""
    monkeypatch.setenv("RELRET_CACHE", str(tmp_path / "empty-cache"))
    ratings, captions = tmp_path / "r.csv", tmp_path / "c.csv"
    _write_ratings(ratings, ["s,t,q,A.wav,f,A.wav,TP,90"])
    captions.write_text("file_name,caption_1,caption_2\nA.wav,q,y\n")
    argv = ["--ratings", str(ratings), "--captions", str(captions), "--out", str(tmp_path / "o.yaml")]
    assert cal.main([*argv, "--sbert", "all-mpnet-base-v2"]) == 2
    err = capsys.readouterr().err
    assert "all-mpnet-base-v2 is not installed" in err and "python -m relret sbert install all-mpnet-base-v2" in err
    assert cal.main([*argv, "--sbert", "all-mpnet-base-v9"]) == 2
    assert "is neither a known model name nor an existing directory" in capsys.readouterr().err
    assert not (tmp_path / "o.yaml").exists()


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
            "--sbert",
            "all-MiniLM-L6-v2",  # by name (the default)
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
