"""Loading for eval: the tokenizer is checked before any weight is read; --family must agree with the config."""
import json
from pathlib import Path

import pytest
import torch

from fixtures.eval import toys
from klass_patch.evaluation.cli import main
from klass_patch.evaluation.loading import detect_family, load_model

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


@pytest.fixture(scope="module")
def dream_folder(tmp_path_factory):
    return toys.model_folder(tmp_path_factory.mktemp("toy") / "toy_dream_model", "dream")


def test_folder_without_tokenizer_fails_before_the_weights(tmp_path, monkeypatch, capsys):
    folder = toys.model_folder(tmp_path / "no_tokenizer", "llada")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    import transformers

    weights = []
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", lambda *a, **k: weights.append(a))
    with pytest.raises(ValueError, match=rf"--model: no tokenizer could be loaded from {folder} \("):
        load_model(str(folder), "cpu", torch.float32)
    argv = ["eval", "--model", str(folder), "--dataset", "gsm8k", "--data", str(FIXTURES / "gsm8k.jsonl"),
            "--out", str(tmp_path / "out"), "--no-progress", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no tokenizer could be loaded" in err and "Traceback" not in err
    assert weights == []


@pytest.mark.parametrize("family,other", [("dream", "llada"), ("llada", "dream")])
def test_family_that_contradicts_the_config_is_refused(tmp_path, capsys, family, other):
    folder = toys.model_folder(tmp_path / f"toy_{family}", family)
    assert detect_family(str(folder)) == family == detect_family(str(folder), family)
    with pytest.raises(ValueError, match=rf"family \(--family\) is '{other}', but {folder} is a {family} model by "
                                         rf"its config \(model_type '(Dream|llada)'.*pass --family {family}, or leave"):
        detect_family(str(folder), other)
    argv = ["eval", "--model", str(folder), "--family", other, "--dataset", "gsm8k", "--no-progress",
            "--data", str(FIXTURES / "gsm8k.jsonl"), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert f"is a {family} model by its config" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before the folder was touched


def test_family_given_where_the_config_does_not_say(tmp_path, dream_folder):
    """A derived model whose config names neither family: --family decides (and is needed)."""
    folder = tmp_path / "derived"
    folder.mkdir()
    for path in dream_folder.iterdir():
        if path.is_file():
            (folder / path.name).write_bytes(path.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="derived_toy", architectures=["DerivedModel"])
    (folder / "config.json").write_text(json.dumps(config))
    assert detect_family(str(folder), "dream") == "dream"
    with pytest.raises(ValueError, match="cannot tell the model family .* pass --family llada or --family dream"):
        detect_family(str(folder))
