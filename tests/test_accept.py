"""Refusals accepted by name, and ``--set`` on source fields (#34).

``apply --accept sliding-window`` converts a Phi-3-mini-4k (in small: a window of 12 tokens) to Llama anyway: the
output equals the source, run by transformers' own Phi3 class, for prompts up to the window, says so in one line,
records it in its metadata, and ``verify`` proves it up to that length and says so. ``--set`` on a source field
is seen by planning (it lifts the refusal it answers) and recorded; a name that is no field is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from test_phi3 import FAMILY, Cli, load_strictly, logits, phi3_model, save

WINDOW = FAMILY["phi-3-mini-4k"]["sliding_window"]


def metadata(folder: Path) -> dict[str, str]:
    with safe_open(folder / "model.safetensors", "pt") as fh:
        return dict(fh.metadata())


def test_an_accepted_window_gives_a_llama_exact_within_it(cli: Cli, tmp_path: Path) -> None:
    model = phi3_model(FAMILY["phi-3-mini-4k"])
    src, out = save(model, tmp_path / "src"), tmp_path / "out"
    code, _, err = cli("apply", "--source", src, "--to", "llama", "--out", out, "--quiet", "--accept", "sliding-window")
    assert code == 0, err
    said = [line for line in err.splitlines() if "--accept" in line]
    assert said == [
        f"warning: --accept sliding-window: the output computes the source's function for inputs up to {WINDOW} "
        f"tokens; past {WINDOW} tokens each token attends to every earlier token, where the source attends only "
        "within its sliding window"
    ]
    code, _, err = cli("plan", "--source", src, "--to", "llama", "--quiet", "--accept", "sliding-window")
    assert code == 0 and said[0] in err.splitlines(), err  # the dry run says it too
    llama = load_strictly(out, "llama")
    for n in (WINDOW - 2, WINDOW):  # a prompt shorter than the window, and one as long as it
        assert (logits(model, n) - logits(llama, n)).abs().max().item() <= 1e-5, n
    assert (logits(model, 40) - logits(llama, 40)).abs().max().item() > 1e-3  # past it: what was accepted
    recorded = json.loads(metadata(out)["phi_rules.accepted"])
    assert recorded == [{"refusal": "sliding-window", "exact_up_to": WINDOW, "differs": said[0].split("tokens ")[-1]}]
    code, shown, err = cli("verify", "--source", src, out)
    assert code == 0, shown + err
    assert f"logits at {WINDOW} tokens" in shown  # probed up to the window, not past it
    assert f"computes the original function for inputs up to {WINDOW} tokens, as --accept sliding-window" in shown
    code, _, err = cli(
        "apply", "--source", src, "--to", "llama", "--out", tmp_path / "v", "--quiet", "--accept", "sliding-window",
        "--verify",
    )  # fmt: skip
    assert code == 0, err


@pytest.mark.parametrize(
    ("member", "accept", "says"),
    [
        (
            "phi-3-mini-4k",
            "sliding-windw",
            "--accept sliding-windw: rule phi3-to-llama has no refusal 'sliding-windw'; did you mean 'sliding-window'? "
            "(its refusals: partial-rotary, sliding-window, rope-type)",
        ),
        ("phi-4-mini", "partial-rotary", "--accept partial-rotary: this refusal cannot be accepted"),
    ],
)
def test_an_accept_that_cannot_be_is_one_line(cli: Cli, tmp_path: Path, member: str, accept: str, says: str) -> None:
    src = save(phi3_model(FAMILY[member]), tmp_path / "src")
    for command in (["plan"], ["apply", "--out", tmp_path / "out"]):
        code, _, err = cli(*command, "--source", src, "--to", "llama", "--accept", accept)
        assert code == 1 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_an_accepted_refusal_needs_metadata_to_record_it(cli: Cli, tmp_path: Path) -> None:
    src = save(phi3_model(FAMILY["phi-3-mini-4k"]), tmp_path / "src")
    code, _, err = cli(
        "apply", "--source", src, "--to", "llama", "--out", tmp_path / "out", "--accept", "sliding-window",
        "--format", "bin", "--quiet",
    )  # fmt: skip
    assert code == 1 and "drop --format bin" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_set_on_a_source_field_is_seen_by_planning_and_recorded(cli: Cli, tmp_path: Path) -> None:
    src = save(phi3_model(FAMILY["phi-3-mini-4k"]), tmp_path / "src")
    code, _, err = cli("plan", "--source", src, "--to", "llama", "--set", "sliding_window=null")
    assert code == 0, err  # the refusal reads the value given
    out = tmp_path / "out"
    given = ("--set", "sliding_window=null", "--set", "max_position_embeddings=128")
    code, _, err = cli("apply", "--source", src, "--to", "llama", "--out", out, "--quiet", *given)
    assert code == 0, err
    assert json.loads(metadata(out)["phi_rules.set"]) == {"max_position_embeddings": 128, "sliding_window": None}
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 128  # a copied source field


def test_set_on_a_name_that_is_no_field_is_refused(cli: Cli, tmp_path: Path) -> None:
    src = save(phi3_model(FAMILY["phi-3-mini-4k"]), tmp_path / "src")
    code, _, err = cli(
        "apply", "--source", src, "--to", "mistral", "--out", tmp_path / "out", "--set", "sliding_windw=4", "--quiet"
    )
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "--set sliding_windw: neither a source field this rule reads nor a MistralConfig field" in err
    assert "did you mean 'sliding_window'?" in err
    assert not (tmp_path / "out").exists()
