import numpy as np
import pytest

from relret import zeroshot


def test_zero_shot_metrics_hand_computed():
    """3 classes, 7 clips with ties: top-1, top-5 and per-class AP (full ranking, lower index first) by hand."""
    s = 1 / np.sqrt(2)
    audio = np.array(
        [
            [0.8, 0.6, 0.0],  # label 0, predicted 0
            [0.6, 0.8, 0.0],  # label 0, predicted 1
            [0.0, 0.6, 0.8],  # label 1, predicted 2
            [0.0, 1.0, 0.0],  # label 1, predicted 1
            [0.6, 0.0, 0.8],  # label 2, predicted 2
            [0.8, 0.0, 0.6],  # label 2, predicted 0
            [s, s, 0.0],  # label 1, classes 0 and 1 tie: the lower index (0) is predicted
        ]
    )
    labels = np.array([0, 0, 1, 1, 2, 2, 1])
    out = zeroshot.zero_shot_metrics(audio, labels, np.eye(3), class_names=["dog", "rain", "siren"])
    assert out["top1_acc"] == pytest.approx(3 / 7)
    assert out["top5_acc"] == 1.0  # with 3 classes every label is in the top 5
    # class 0 ranking: 0 (.8), 5 (.8), 6 (.71), 1 (.6), 4 (.6), 2, 3; its clips 0, 1 at ranks 1, 4.
    # class 1 ranking: 3 (1), 1 (.8), 6 (.71), 0 (.6), 2 (.6), 4, 5; its clips 3, 6, 2 at ranks 1, 3, 5.
    # class 2 ranking: 2 (.8), 4 (.8), 5 (.6), 0, 1, 3, 6; its clips 4, 5 at ranks 2, 3.
    expected = {"dog": (1 / 1 + 2 / 4) / 2, "rain": (1 / 1 + 2 / 3 + 3 / 5) / 3, "siren": (1 / 2 + 2 / 3) / 2}
    assert out["per_class_AP"] == pytest.approx(expected)
    assert out["mAP"] == pytest.approx(np.mean(list(expected.values())))
    assert out["classes_without_clips"] == [] and (out["n_clips"], out["n_classes"]) == (7, 3)
    assert "top1 42.86%" in zeroshot.format_zero_shot(out)


def test_per_class_ap_matches_sklearn_without_ties():
    """On random scores (no ties) the per-class AP equals scikit-learn's average_precision_score."""
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    audio, text = rng.normal(size=(60, 8)), rng.normal(size=(5, 8))
    labels = rng.integers(0, 4, 60)  # class 4 has no clip
    out = zeroshot.zero_shot_metrics(audio, labels, text)
    cos = (audio / np.linalg.norm(audio, axis=1, keepdims=True)) @ (text / np.linalg.norm(text, axis=1)[:, None]).T
    for c in range(4):
        assert out["per_class_AP"][str(c)] == pytest.approx(average_precision_score(labels == c, cos[:, c]))
    assert out["classes_without_clips"] == ["4"]
    assert out["top1_acc"] == pytest.approx(np.mean(cos.argmax(1) == labels))


def test_template_averaging():
    """Several templates: the mean of the unit embeddings, renormalised; class names lose _ and -."""
    assert zeroshot.class_prompt("car_horn", "the sound of a {class}") == "the sound of a car horn"
    assert zeroshot.class_prompt("dog-bark", "{class} can be heard") == "dog bark can be heard"
    vectors = {
        "the sound of a car horn": [2.0, 0.0],
        "car horn can be heard": [0.0, 3.0],
        "the sound of a dog": [0.0, 5.0],
        "dog can be heard": [0.0, 0.5],
    }
    emb = zeroshot.class_text_embeddings(
        ["car_horn", "dog"],
        lambda texts: np.array([vectors[t] for t in texts]),
        templates=("the sound of a {class}", "{class} can be heard"),
    )
    assert emb == pytest.approx(np.array([[1 / np.sqrt(2), 1 / np.sqrt(2)], [0.0, 1.0]]))
    single = zeroshot.class_text_embeddings(["dog"], lambda texts: np.array([vectors[t] for t in texts]))
    assert single == pytest.approx(np.array([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="no \\{class\\} placeholder"):
        zeroshot.class_prompt("dog", "a sound")


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RIFF")


def test_read_labels_esc50_layout(tmp_path):
    """ESC-50 (filename, category): a missing file is skipped and counted, or refused past the limit."""
    for name in ("1-100032-A-0.wav", "1-100038-A-14.wav", "2-102414-A-17.wav"):
        _touch(tmp_path / "audio" / name)
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "esc50.csv").write_text(
        "filename,fold,target,category,esc10,src_file,take\n"
        "1-100032-A-0.wav,1,0,dog,True,100032,A\n"
        "1-100038-A-14.wav,1,14,chirping_birds,False,100038,A\n"
        "2-102414-A-17.wav,2,17,pouring_water,False,102414,A\n"
        "5-9032-A-0.wav,5,0,dog,True,9032,A\n"
    )
    with pytest.raises(ValueError, match=r"1 of 4 files .* not under .*5-9032-A-0.wav"):
        zeroshot.read_labels(tmp_path / "meta" / "esc50.csv", tmp_path / "audio")
    got = zeroshot.read_labels(tmp_path / "meta" / "esc50.csv", tmp_path / "audio", max_missing_fraction=0.25)
    assert got.class_names == ["chirping_birds", "dog", "pouring_water"]
    assert got.labels.tolist() == [1, 0, 2] and got.missing == ["5-9032-A-0.wav"] and got.rows == 4
    assert got.paths[1] == tmp_path / "audio" / "1-100038-A-14.wav"


def test_read_labels_urbansound_and_generic_layouts(tmp_path):
    """UrbanSound8K (slice_file_name, class; files in fold folders) and a generic file_name,class CSV."""
    _touch(tmp_path / "audio" / "fold1" / "100032-3-0-0.wav")
    _touch(tmp_path / "audio" / "fold5" / "100263-2-0-117.wav")
    (tmp_path / "UrbanSound8K.csv").write_text(
        "slice_file_name,fsID,start,end,salience,fold,classID,class\n"
        "100032-3-0-0.wav,100032,0.0,0.317551,1,1,3,dog_bark\n"
        "100263-2-0-117.wav,100263,58.5,62.5,1,5,2,children_playing\n"
    )
    got = zeroshot.read_labels(tmp_path / "UrbanSound8K.csv", tmp_path / "audio")
    assert got.paths == [tmp_path / "audio" / "fold1" / "100032-3-0-0.wav", tmp_path / "audio" / "fold5" /
                         "100263-2-0-117.wav"]  # fmt: skip
    assert got.class_names == ["children_playing", "dog_bark"] and got.labels.tolist() == [1, 0]
    (tmp_path / "labels.csv").write_text("file_name,class\nfold1/100032-3-0-0.wav,dog\n")
    assert zeroshot.read_labels(tmp_path / "labels.csv", tmp_path / "audio").class_names == ["dog"]
    (tmp_path / "odd.csv").write_text("path,label_text\nx.wav,dog\n")
    with pytest.raises(ValueError, match="pass file_column= and class_column="):
        zeroshot.read_labels(tmp_path / "odd.csv", tmp_path / "audio")
    got = zeroshot.read_labels(
        tmp_path / "odd.csv", tmp_path / "audio", file_column="path", class_column="label_text", max_missing_fraction=1
    )
    assert got.missing == ["x.wav"] and got.paths == []
