"""The ops on real bytes: a split or concat along a dim whose leading dims are not 1 is not one byte range (it
runs on tensors, and comes out as torch computes it), parts of such a split are not contiguous (a view of them
is refused in the plan, in one line), and a missing input of a transform is zero-filled only with `absent`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import phi_rules

RULE = """version: 1
name: ops
source:
  fields: [hidden_size]
target:
  architecture: PhiForCausalLM
  check: false
  config: {{}}
steps:
  - name: the-ops
    transform:
      from: {frm}
      ops: {ops}
      to: {to}
"""


def convert(tmp: Path, state: dict[str, torch.Tensor], frm: str, ops: str, to: str) -> dict[str, torch.Tensor]:
    rule = tmp / "rule.yaml"
    rule.write_text(RULE.format(frm=frm, ops=ops, to=to))
    (tmp / "src").mkdir(exist_ok=True)
    save_file(state, tmp / "src" / "model.safetensors")
    (tmp / "src" / "config.json").write_text('{"hidden_size": 3}')
    options = phi_rules.Options(source=phi_rules.SourceOptions(source=tmp / "src"))
    phi_rules.convert(phi_rules.load_rules(rule), tmp / "out", options)
    return load_file(tmp / "out" / "model.safetensors")


def test_a_split_along_an_inner_dim_is_torch_s_split(tmp_path: Path) -> None:
    x = torch.arange(24.0).reshape(4, 6)
    out = convert(tmp_path, {"a.weight": x}, "a", "[{split: {dim: 1, sizes: [2, 4]}}]", "[b, c]")
    left, right = torch.split(x, [2, 4], dim=1)
    assert torch.equal(out["b.weight"], left) and torch.equal(out["c.weight"], right)


def test_a_split_along_dim_0_is_byte_ranges_of_rows(tmp_path: Path) -> None:
    x = torch.arange(24.0).reshape(6, 4)
    out = convert(tmp_path, {"a.weight": x}, "a", "[{split: {dim: 0, sizes: [2, 4]}}]", "[b, c]")
    assert torch.equal(out["b.weight"], x[:2]) and torch.equal(out["c.weight"], x[2:])


def test_a_concat_along_an_inner_dim_is_torch_s_cat(tmp_path: Path) -> None:
    x, y = torch.arange(12.0).reshape(4, 3), -torch.arange(8.0).reshape(4, 2)
    out = convert(tmp_path, {"a.weight": x, "b.weight": y}, "[a, b]", "[{concat: {dim: 1}}]", "c")
    assert torch.equal(out["c.weight"], torch.cat([x, y], dim=1))


@pytest.mark.parametrize("ops", ["[{split: {dim: 1, parts: 2}}, {view: [-1]}]", "[{transpose: [0, 1]}, {view: [-1]}]"])
def test_a_view_of_a_tensor_that_is_not_contiguous_is_refused_in_the_plan(tmp_path: Path, ops: str) -> None:
    to = "[b, c]" if "split" in ops else "b"
    with pytest.raises(phi_rules.PhiRulesError, match="needs a contiguous tensor"):
        convert(tmp_path, {"a.weight": torch.zeros(4, 6)}, "a", ops, to)
    assert not (tmp_path / "out").exists()


def test_a_missing_input_stops_a_transform_without_absent(tmp_path: Path) -> None:
    state = {"a.0.weight": torch.ones(2, 3), "b.0.weight": torch.ones(2, 3), "a.1.weight": torch.ones(2, 3)}
    with pytest.raises(phi_rules.PhiRulesError, match="needs exactly one tensor per pattern"):
        convert(tmp_path, state, "['a.{i:int}', 'b.{i}']", "[{concat: {dim: 0}}]", "'c.{i}'")
    assert not (tmp_path / "out").exists()
