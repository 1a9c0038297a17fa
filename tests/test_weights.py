"""Weight files that torch.save did not write: one ValueError line naming the param, the file and the fix."""

from __future__ import annotations

import pytest
import torch
import yaml

from components.models.weights import read_state_dict


@pytest.mark.parametrize("content, looks", [
    (b"abc\n", "a text file starting 'abc\\n'"),  # torch.load: IndexError: pop from empty list
    (b"hello world", "a text file"),               # torch.load: KeyError: 101
    (b"", "an empty file"),                        # torch.load: EOFError
    (b"\x89PNG\r\n\x1a\n" + bytes(20), "a binary file"),
])
def test_a_file_torch_save_did_not_write(tmp_path, content, looks):
    path = tmp_path / "resnet18.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        read_state_dict(path, "model.backbone_weights")
    msg = str(e.value)
    assert msg.startswith(f"model.backbone_weights = '{path}': not a file torch.save wrote ({looks}")
    assert msg.endswith("give a state dict saved with torch.save") and "\n" not in msg


def test_damaged_and_pickled_torch_files(tmp_path):
    torch.save({"w": torch.zeros(3)}, tmp_path / "ok.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cut.pt': a damaged torch.save file \(PytorchStreamReader"):
        read_state_dict(tmp_path / "cut.pt", "model.sr.weights")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a whole module, not a state dict
    with pytest.raises(ValueError, match=r"module.pt': not a plain state dict of tensors; "
                                         r"torch.load\(weights_only=True\) refused it \(Unsupported global"):
        read_state_dict(tmp_path / "module.pt", "model.sr.weights")


def test_backbone_weights_text_file_stops_the_model_build(tmp_path):
    from components.models.backbones import load_backbone_weights

    path = tmp_path / "weights.txt"
    path.write_text("abc")
    net = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"^model.backbone_weights = .*weights.txt': not a file torch.save wrote"):
        load_backbone_weights(net, path, "resnet18")


def test_evaluate_model_text_file_is_one_error_line(tmp_path, monkeypatch, capsys):
    """`lrreid evaluate --model some.txt` (components/training/state.py load_weights_file)."""
    from components.config import Params
    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({name: {} for name in Params.model_fields}))
    (tmp_path / "some.txt").write_text("abc")
    assert main(["evaluate", "--no-progress", "--model", "some.txt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lrreid evaluate: error: some.txt: not a file torch.save wrote"), err
