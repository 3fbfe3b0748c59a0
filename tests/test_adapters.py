"""Adapters trained on the old layouts convert by function: PEFT itself writes a LoRA or DoRA adapter
onto modules named like the original remote code; base and adapter are converted with no rule named;
PEFT loads the converted adapter on the converted base, and its logits equal the original model with
the adapter merged into its own weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from phi_modules import MixFormerSequential, PhiMsft, from_mixformer
from phi_reference import (
    IDS,
    PHI_MAPPING,
    MsftConfig,
    config_436,
    random_state,
    reference_logits,
    to_mixformer,
    to_transformers_436,
    write_checkpoint,
)
from safetensors.torch import load_file, save_file

peft = pytest.importorskip("peft", reason="adapters need the peft extra")

CFG = MsftConfig(vocab_size=80, n_embd=160, n_layer=2, n_head=2, rotary_dim=32, n_inner=200)  # head_dim 80
CASES = [
    ("lora-all-four", "msft", ["Wqkv", "out_proj", "fc1", "fc2"], False),
    ("lora-wqkv-only", "msft", ["Wqkv"], False),
    ("dora", "msft", ["Wqkv", "out_proj", "fc1", "fc2"], True),
    ("mixformer-lora", "mixformer", ["Wqkv", "out_proj", "fc2"], False),
    ("mixformer-dora-regex", "mixformer", r".*\.(Wqkv|fc1)", True),
]


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Every random init of a test (PEFT's LoRA init, DoRA magnitudes) the same each run: no flaky bound."""
    torch.manual_seed(0)


def original(layout: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = PhiMsft(CFG) if layout == "msft" else MixFormerSequential(CFG)
    model.load_state_dict(state if layout == "msft" else to_mixformer(state, CFG.n_layer))
    return model.eval()


def test_modules_compute_the_reference_function() -> None:
    state = random_state(CFG, seed=1)
    expected = reference_logits(state, CFG, IDS)
    for layout in ("msft", "mixformer"):
        with torch.no_grad():
            assert (original(layout, state)(IDS) - expected).abs().max() < 1e-5


@pytest.mark.parametrize(("layout", "targets", "dora"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_adapter_converts_by_function(cli, tmp_path: Path, layout: str, targets: object, dora: bool) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    state = random_state(CFG, seed=3)
    write_checkpoint(tmp_path / "base", state if layout == "msft" else to_mixformer(state, CFG.n_layer), CFG)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora, init_lora_weights=False)
    trained = get_peft_model(original(layout, state), lora)
    trained.save_pretrained(tmp_path / "adapter")  # what users hold: PEFT's own files
    merged = trained.merge_and_unload().state_dict()
    if layout == "mixformer":
        merged = from_mixformer(merged, CFG.n_layer)
    expected = reference_logits(merged, CFG, IDS)
    assert (expected - reference_logits(state, CFG, IDS)).abs().max() > 1e-2  # the adapter matters

    for src, out in (("base", "base-out"), ("adapter", "adapter-out")):
        code, _, err = cli("apply", "--source", tmp_path / src, "--out", tmp_path / out, "--quiet")
        assert code == 0, err
    written = load_file(tmp_path / "adapter-out" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter-out" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["use_dora"] == dora
    assert "Wqkv" not in json.dumps(config["target_modules"])

    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base-out", dtype=torch.float32, attn_implementation="eager"
    )
    adapted = PeftModel.from_pretrained(model, tmp_path / "adapter-out").eval()
    loaded = get_peft_model_state_dict(adapted)
    assert sorted(loaded) == sorted(written)  # every LoRA module the file has was loaded, and no other exists
    for name, tensor in written.items():
        assert torch.equal(loaded[name], tensor), name
    verify = ["verify", "--source", tmp_path / "adapter", tmp_path / "adapter-out"]
    code, _, err = cli(*verify, "--base", tmp_path / "base", tmp_path / "base-out")
    assert code == 0, err
    with torch.no_grad():
        got = adapted(IDS[None]).logits[0]
        assert (got - expected).abs().max().item() <= 1e-5
        merged_model = adapted.merge_and_unload()
        assert (merged_model(IDS[None]).logits[0] - expected).abs().max().item() <= 1e-5


def test_adapter_config_rewrite_and_set(cli, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    state = random_state(CFG, seed=4)
    lora = LoraConfig(r=2, target_modules=["Wqkv", "out_proj"], modules_to_save=None, init_lora_weights=False)
    get_peft_model(original("msft", state), lora).save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    code, _, err = cli(
        "apply", "--source", tmp_path / "adapter", "--out", out, "--set", "base_model_name_or_path=./phi-2-converted"
    )
    assert code == 0, err
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["dense", "k_proj", "q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == "./phi-2-converted" and config["auto_mapping"] is None
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert "warning" not in err  # an adapter uses its base's tokenizer


def test_adapter_with_an_unmapped_module_is_refused(cli, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=2, target_modules=["Wqkv", "linear"], init_lora_weights=False)  # the head's linear
    get_peft_model(original("msft", random_state(CFG, seed=5)), lora).save_pretrained(tmp_path / "adapter")
    rule = Path(__file__).resolve().parent.parent / "rules" / "adapters" / "phi-msft-lora.yaml"
    code, _, err = cli("apply", rule, "--source", tmp_path / "adapter", "--out", tmp_path / "out")
    assert code == 1 and not (tmp_path / "out").exists() and "Traceback" not in err
    assert "target_modules: module 'linear' has no mapping in the rule" in err


def test_without_peft_adapter_conversion_says_so(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=2, target_modules=["Wqkv"], init_lora_weights=False)
    get_peft_model(original("msft", random_state(CFG, seed=6)), lora).save_pretrained(tmp_path / "adapter")
    monkeypatch.setitem(sys.modules, "peft", None)  # as if it were not installed
    code, _, err = cli("apply", "--source", tmp_path / "adapter", "--out", tmp_path / "out")
    assert code == 1 and not (tmp_path / "out").exists()
    assert err.strip().splitlines()[-1] == (  # after the note that says which rule was chosen
        "error: converting adapters needs PEFT, which is not installed: pip install 'phi-rules[peft]'"
    )


def test_verify_catches_a_wrong_adapter_conversion(cli, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    state = random_state(CFG, seed=8)
    write_checkpoint(tmp_path / "base", state, CFG)
    lora = LoraConfig(r=4, target_modules=["Wqkv", "fc2"], use_dora=True, init_lora_weights=False)
    get_peft_model(original("msft", state), lora).save_pretrained(tmp_path / "adapter")
    for src, out in (("base", "base-out"), ("adapter", "adapter-out")):
        assert cli("apply", "--source", tmp_path / src, "--out", tmp_path / out, "--quiet")[0] == 0
    verify = ["verify", "--source", tmp_path / "adapter", tmp_path / "adapter-out"]
    base = ["--base", tmp_path / "base", tmp_path / "base-out"]
    assert cli(*verify, *base)[0] == 0
    written = load_file(tmp_path / "adapter-out" / "adapter_model.safetensors")
    q, k = (f"base_model.model.model.layers.0.self_attn.{p}_proj.lora_B.weight" for p in "qk")
    written[q], written[k] = written[k].clone(), written[q].clone()  # the row blocks of B mixed up
    save_file(written, tmp_path / "adapter-out" / "adapter_model.safetensors", metadata={"format": "pt"})
    code, _, err = cli(*verify, *base)
    assert code == 1 and err.startswith(f"error: {tmp_path / 'adapter-out'}: layer 0 attention diverges"), err


def test_adapter_conversion_prints_no_library_noise(tmp_path: Path) -> None:
    """No PEFT 'renamed to None' warning (the output has the value), no FutureWarning with site-packages paths."""
    from conftest import run_phi_rules
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=2, target_modules=["Wqkv", "fc1"], init_lora_weights=False)
    get_peft_model(original("msft", random_state(CFG, seed=4)), lora).save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    run = run_phi_rules("apply", "--source", tmp_path / "adapter", "--out", out, "--set", "base_model_name_or_path=b")
    assert run.returncode == 0, run.stderr
    assert all(line.startswith(("note:", str(out))) for line in run.stderr.splitlines()), run.stderr


def test_rank_and_alpha_patterns_convert_with_their_modules(cli, tmp_path: Path) -> None:
    """alpha_pattern and rank_pattern keys on Wqkv are rewritten with it: an unconverted key would leave q, k
    and v at the global alpha (logits off by ~4 here), and verify --base catches that."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    state = random_state(CFG, seed=9)
    write_checkpoint(tmp_path / "base", state, CFG)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["Wqkv", "fc1"],
        alpha_pattern={"Wqkv": 64},
        rank_pattern={"transformer.h.1.mlp.fc1": 2},
        init_lora_weights=False,
    )
    torch.manual_seed(6)  # alpha 64: a large update, whose float32 rounding some draws put just over 1e-5
    trained = get_peft_model(original("msft", state), lora)
    trained.save_pretrained(tmp_path / "adapter")
    expected = reference_logits(trained.merge_and_unload().state_dict(), CFG, IDS)
    for src, out in (("base", "base-out"), ("adapter", "adapter-out")):
        code, _, err = cli("apply", "--source", tmp_path / src, "--out", tmp_path / out, "--quiet")
        assert code == 0, err
    config = json.loads((tmp_path / "adapter-out" / "adapter_config.json").read_text())
    assert config["alpha_pattern"] == {"(?:q_proj|k_proj|v_proj)": 64}
    assert config["rank_pattern"] == {"model.layers.1.mlp.fc1": 2}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base-out", dtype=torch.float32)
    adapted = PeftModel.from_pretrained(model, tmp_path / "adapter-out").eval()
    with torch.no_grad():
        assert (adapted(IDS[None]).logits[0] - expected).abs().max().item() <= 1e-5
    verify = ["verify", "--source", tmp_path / "adapter", tmp_path / "adapter-out"]
    base = ["--base", tmp_path / "base", tmp_path / "base-out"]
    assert cli(*verify, *base)[0] == 0
    config["alpha_pattern"] = {"Wqkv": 64}  # as the old conversion left it: matches no module of today's Phi
    (tmp_path / "adapter-out" / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = cli(*verify, *base)
    assert code == 1 and "layer 0 attention diverges" in err, err


def _as_436(folder: Path, out: Path) -> None:
    """A phi-msft adapter as it reads on the transformers 4.36 model: 4.36 names, and B's rows (DoRA's magnitude)
    in the seed's per-head interleave, like the query_key_value weight they add to."""
    tensors = load_file(folder / "adapter_model.safetensors")
    moved = {}
    for name, t in tensors.items():
        if ".Wqkv.lora_B" in name:
            t = t.view(3, CFG.n_head, -1, t.shape[1]).transpose(0, 1).reshape(t.shape)
        elif ".Wqkv.lora_magnitude_vector" in name:
            t = t.view(3, CFG.n_head, -1).transpose(0, 1).reshape(t.shape)
        for old, new in PHI_MAPPING.items():
            if old != "ln":  # the seed's mapping of layer norms; no adapter name has it
                name = name.replace(old, new)
        moved[name] = t.contiguous()
    out.mkdir()
    save_file(moved, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = [PHI_MAPPING.get(m, m) for m in config["target_modules"]]
    config["alpha_pattern"] = {PHI_MAPPING.get(k, k): v for k, v in config["alpha_pattern"].items()}
    (out / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_transformers_436_adapter_converts_with_its_base(cli, tmp_path: Path, dora: bool) -> None:
    """query_key_value's B rows are de-interleaved per head, with the head count from --base."""
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    state = random_state(CFG, seed=10)
    base = write_checkpoint(tmp_path / "base", to_transformers_436(state, CFG), None)
    (base / "config.json").write_text(json.dumps(config_436(CFG)))
    # LoRA's random init and DoRA's magnitudes: the same adapter every run. Unseeded, about one draw in 15 put
    # float32 rounding at 1.2-1.6e-5, over the 1e-5 bound; this one stays under it.
    torch.manual_seed(1)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["Wqkv", "out_proj", "fc2"],
        alpha_pattern={"Wqkv": 24},
        use_dora=dora,
        init_lora_weights=False,
    )
    trained = get_peft_model(original("msft", state), lora)
    if dora:
        with torch.no_grad():
            for name, p in trained.named_parameters():
                if "magnitude" in name:
                    p.mul_(torch.rand_like(p) + 0.5)
    trained.save_pretrained(tmp_path / "msft-adapter")
    expected = reference_logits(trained.merge_and_unload().state_dict(), CFG, IDS)
    _as_436(tmp_path / "msft-adapter", tmp_path / "adapter")

    out = tmp_path / "adapter-out"
    code, _, err = cli("apply", "--source", tmp_path / "adapter", "--out", out)
    assert code == 1 and not out.exists() and "pass --base BASE" in err, err
    code, _, err = cli("apply", "--source", tmp_path / "adapter", "--out", out, "--base", base)
    assert code == 0, err
    assert cli("apply", "--source", base, "--out", tmp_path / "base-out", "--quiet")[0] == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base-out", dtype=torch.float32)
    adapted = PeftModel.from_pretrained(model, out).eval()
    written = load_file(out / "adapter_model.safetensors")
    assert sorted(written) == sorted(get_peft_model_state_dict(adapted))  # PEFT loads every tensor written
    with torch.no_grad():
        assert (adapted(IDS[None]).logits[0] - expected).abs().max().item() <= 1e-5
    verify = ["verify", "--source", tmp_path / "adapter", out, "--base", base, tmp_path / "base-out"]
    code, _, err = cli(*verify)
    assert code == 0, err


@pytest.mark.parametrize(
    ("layout", "dora"), [("msft", False), ("msft", True), ("mixformer", False)], ids=["lora", "dora", "mixformer"]
)
def test_legacy_adapter_round_trips_bit_for_bit(cli, tmp_path: Path, layout: str, dora: bool) -> None:
    """A legacy adapter -> today's -> back (phi-adapter-to-phi-msft or -to-mixformer-sequential, derived): B's
    rows and DoRA's magnitude joined back, the one A that q, k and v share taken back (take_one), blocks moved
    back up for MixFormer, every tensor bit for bit, and adapter_config.json's modules named as PEFT named them
    on the remote code. An A that q, k and v do not share stops the way back in one line."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    state = random_state(CFG, seed=5)
    torch.manual_seed(1)
    targets = ["Wqkv", "out_proj", "fc1", "fc2"]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora, init_lora_weights=False)
    get_peft_model(original(layout, state), lora).save_pretrained(tmp_path / "adapter")
    code, _, err = cli("apply", "--source", tmp_path / "adapter", "--out", tmp_path / "today", "--quiet")
    assert code == 0, err
    code, _, err = cli("apply", "--source", tmp_path / "today", "--out", tmp_path / "same")  # detected: nothing to do
    assert code == 1 and "already in transformers' PhiForCausalLM layout" in err and "--to" in err
    back_to = "phi-msft-adapter" if layout == "msft" else "mixformer-sequential-adapter"
    code, _, err = cli("apply", "--source", tmp_path / "today", "--to", back_to, "--out", tmp_path / "back", "--quiet")
    assert code == 0, err
    before = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    after = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    back = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert sorted(back["target_modules"]) == sorted(targets) and back["use_dora"] == dora
    today = load_file(tmp_path / "today" / "adapter_model.safetensors")
    today["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"][0, 0] += 1
    save_file(today, tmp_path / "today" / "adapter_model.safetensors")
    code, _, err = cli("apply", "--source", tmp_path / "today", "--to", back_to, "--out", tmp_path / "again")
    assert code == 1 and "the 3 copies differ" in err and "Traceback" not in err
    assert not (tmp_path / "again").exists()


ROUND_TRIPS = [
    ("msft-layers", "msft", {"target_modules": ["Wqkv", "fc1"], "layers_to_transform": [0], "layers_pattern": "h"}),
    (
        "mixformer-layers",  # blocks at layers.1..N: block 1 is today's layer 0
        "mixformer",
        {"target_modules": ["Wqkv", "fc2"], "layers_to_transform": [1], "layers_pattern": "layers"},
    ),
    ("msft-regex-paths", "msft", {"target_modules": r"transformer\.h\.\d+\.mixer\.(Wqkv|out_proj)", "use_dora": True}),
]


@pytest.mark.parametrize(("layout", "settings"), [c[1:] for c in ROUND_TRIPS], ids=[c[0] for c in ROUND_TRIPS])
def test_adapter_round_trip_keeps_every_peft_field(cli, tmp_path: Path, layout: str, settings: dict) -> None:
    """Forward, then back with --to: PEFT loads each folder on its own model with every tensor written and no
    other, and each computes the function of PEFT's own adapter. layers_pattern names the layout's layer list
    (h, layers), layers_to_transform counts the layout's blocks, a regex's path pieces are the layout's; back,
    every field is the one PEFT wrote, but those that name the base model."""
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    state = random_state(CFG, seed=12)
    write_checkpoint(tmp_path / "base", state if layout == "msft" else to_mixformer(state, CFG.n_layer), CFG)
    torch.manual_seed(2)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **settings)
    trained = get_peft_model(original(layout, state), lora).eval()
    trained.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = trained(IDS)
    assert (expected - reference_logits(state, CFG, IDS)).abs().max() > 1e-2  # the adapter matters
    back_to = "phi-msft-adapter" if layout == "msft" else "mixformer-sequential-adapter"
    for args in (
        ("--source", tmp_path / "base", "--out", tmp_path / "base-out"),
        ("--source", tmp_path / "adapter", "--out", tmp_path / "today"),
        ("--source", tmp_path / "today", "--to", back_to, "--out", tmp_path / "back"),
    ):
        code, _, err = cli("apply", *args, "--quiet")
        assert code == 0, err

    def loads_every_tensor(adapted: torch.nn.Module, folder: Path) -> None:
        written = load_file(folder / "adapter_model.safetensors")
        loaded = get_peft_model_state_dict(adapted)
        assert sorted(loaded) == sorted(written)  # no missing key, no unexpected one
        for name, tensor in written.items():
            assert torch.equal(loaded[name], tensor), name

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base-out", dtype=torch.float32, attn_implementation="eager")
    today = PeftModel.from_pretrained(base, tmp_path / "today").eval()
    loads_every_tensor(today, tmp_path / "today")
    back = PeftModel.from_pretrained(original(layout, state), tmp_path / "back").eval()
    loads_every_tensor(back, tmp_path / "back")
    with torch.no_grad():
        assert (today(IDS[None]).logits[0] - expected).abs().max().item() <= 1e-5
        assert (back(IDS) - expected).abs().max().item() <= 1e-5

    converted = json.loads((tmp_path / "today" / "adapter_config.json").read_text())
    if "layers_pattern" in settings:
        assert converted["layers_pattern"] == "layers" and converted["layers_to_transform"] == [0]
    before = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    after = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    names_the_base = ("base_model_name_or_path", "revision", "auto_mapping", "target_modules")
    assert {k: v for k, v in after.items() if k not in names_the_base} == {
        k: v for k, v in before.items() if k not in names_the_base
    }
    if isinstance(before["target_modules"], list):
        assert sorted(after["target_modules"]) == sorted(before["target_modules"])


@pytest.mark.parametrize("peft_type", ["IA3", "LOHA", "lokr"])
def test_an_adapter_of_another_peft_type_is_refused(cli, tmp_path: Path, peft_type: str) -> None:
    """Only LoRA (and DoRA, a LoRA setting) is what the rules split and join; another method's tensors may share
    names with LoRA's, and converting them as LoRA would be silently wrong."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=2, target_modules=["Wqkv"], init_lora_weights=False)
    get_peft_model(original("msft", random_state(CFG, seed=6)), lora).save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "peft_type": peft_type}))
    rule = Path(__file__).resolve().parent.parent / "rules" / "adapters" / "phi-msft-lora.yaml"
    code, _, err = cli("apply", rule, "--source", tmp_path / "adapter", "--out", tmp_path / "out")
    assert code == 1 and not (tmp_path / "out").exists() and "Traceback" not in err
    assert f"peft_type {peft_type!r}: only LoRA and DoRA adapters convert" in err, err
