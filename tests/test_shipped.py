"""NLAs shipped in the package: packing adapters, loading by name, refusing modified files."""

from __future__ import annotations

import json

import pytest
import torch

from nlakit import NLAError
from nlakit.nla.facade import NLA
from nlakit.nla.pretrained import MANIFEST_FILE, pack_nla, resolve, shipped_names, verify


@pytest.fixture(scope="module")
def adapter_nla(tiny, tiny_store, tmp_path_factory):
    """A tiny NLA whose AV and AR are saved as (randomly initialised, non-zero) LoRA adapters."""
    from peft import LoraConfig, get_peft_model

    from nlakit.nla.checkpoint import save_ar_dir, save_av_dir

    nla = NLA.from_target(tiny, tiny_store.layer, injection_scale=10.0,
                          dataset_stats={"rawvar": tiny_store.stats()["rawvar"]})
    lora = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(0)
    av_model = get_peft_model(nla.av.model, lora)
    ar_body = get_peft_model(nla.ar.body, lora)
    root = tmp_path_factory.mktemp("adapter-nla")
    for meta in (nla.av_meta, nla.ar_meta):
        meta["nlakit"]["weights"] = "adapter"
    av_meta = {k: v for k, v in nla.av_meta.items() if k != "template"}
    ar_meta = {k: v for k, v in nla.ar_meta.items() if k != "template"}
    save_av_dir(root / "av", av_model, nla.av.tokenizer, av_meta)
    save_ar_dir(root / "ar", ar_body, nla.ar.head, nla.ar.tokenizer, ar_meta)
    merged = (av_model.merge_and_unload(), ar_body.merge_and_unload())
    return root, merged


def test_an_adapter_ar_loads_like_its_merged_weights(adapter_nla, tiny):
    from nlakit.nla.reconstructor import Reconstructor

    root, (_, ar_merged) = adapter_nla
    loaded = NLA.load(root, target=tiny)
    reference = Reconstructor(ar_merged, loaded.ar.head, loaded.ar.tokenizer, loaded.ar.template)
    texts = ["the text ends with a colon", "x = 1"]
    got = loaded.reconstruct(texts)
    assert torch.allclose(got, reference.reconstruct(texts), atol=1e-5)
    # the adapters matter: the bare truncated target reads the same texts differently
    bare = Reconstructor.from_target(tiny[0], tiny[1], loaded.layer, loaded.ar.template)
    assert not torch.allclose(got, bare.reconstruct(texts), atol=1e-3)


def test_pack_writes_half_precision_and_loads_by_name(adapter_nla, tmp_path, tiny):
    root, _ = adapter_nla
    (tmp_path / "eval.md").write_text("| method | fve_nrm |\n")
    shipped = tmp_path / "nlas"
    out = pack_nla(root, shipped / "tiny-nla", provenance={"eval.md": tmp_path / "eval.md"})
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert "av/adapter_model.safetensors" in manifest["files"]
    assert "ar/value_head.safetensors" in manifest["files"]
    assert "provenance/eval.md" in manifest["files"]
    from safetensors.torch import load_file

    assert all(t.dtype == torch.float16 for t in load_file(
        str(out / "ar" / "adapter_model.safetensors")).values())
    assert shipped_names(shipped) == ["tiny-nla"]
    assert resolve("tiny-nla", shipped) == out
    assert resolve("no-such-nla", shipped) is None
    nla = NLA.load(out, target=tiny)
    full = NLA.load(root, target=tiny)
    texts = ["a short explanation"]
    # float16 adapters change the reconstruction only at half-precision level
    assert torch.allclose(nla.reconstruct(texts), full.reconstruct(texts), atol=5e-2)


def _absolute_paths(node) -> list[str]:
    if isinstance(node, dict):
        return [p for v in node.values() for p in _absolute_paths(v)]
    if isinstance(node, list):
        return [p for v in node for p in _absolute_paths(v)]
    return [node] if isinstance(node, str) and node.startswith("/") else []


def test_pack_replaces_the_training_machines_paths_by_names_and_digests(adapter_nla, tmp_path):
    import shutil

    from nlakit.fileio import file_sha256, read_yaml, write_yaml

    root, _ = adapter_nla
    nla_dir = tmp_path / "nla"
    shutil.copytree(root, nla_dir)
    store = tmp_path / "machine" / "acts"
    store.mkdir(parents=True)
    (store / "meta.yaml").write_text("kind: store\n")
    meta = read_yaml(nla_dir / "av" / "nla_meta.yaml")
    meta["nlakit"]["provenance"] = {
        "acts": str(store), "labels": "/gone/away/labels", "config": {"lr": 0.1},
        "rl": {"from_nla": str(root), "acts": str(store), "summary": {"steps": 3}}}
    write_yaml(nla_dir / "av" / "nla_meta.yaml", meta)
    out = pack_nla(nla_dir, tmp_path / "nlas" / "tiny-nla")
    prov = read_yaml(out / "av" / "nla_meta.yaml")["nlakit"]["provenance"]
    assert _absolute_paths(prov) == []
    assert prov["acts"] == "machine/acts"
    assert prov["acts_sha256"] == f"meta.yaml:sha256:{file_sha256(store / 'meta.yaml')}"
    assert prov["labels"] == "away/labels" and "labels_sha256" not in prov  # gone: name only
    rl = prov["rl"]
    assert rl["from_nla"] == "/".join(root.parts[-2:])
    start_meta = root / "av" / "nla_meta.yaml"
    assert rl["from_nla_sha256"] == f"av/nla_meta.yaml:sha256:{file_sha256(start_meta)}"
    assert rl["summary"] == {"steps": 3} and prov["config"] == {"lr": 0.1}
    verify(out)


def test_the_shipped_nlas_carry_no_absolute_paths():
    from nlakit.fileio import read_yaml
    from nlakit.nla.pretrained import SHIPPED_ROOT

    for name in shipped_names():
        for role in ("av", "ar"):
            meta = read_yaml(SHIPPED_ROOT / name / role / "nla_meta.yaml")
            assert _absolute_paths(meta["nlakit"].get("provenance", {})) == [], (name, role)


def test_a_modified_or_added_file_is_refused(adapter_nla, tmp_path):
    root, _ = adapter_nla
    out = pack_nla(root, tmp_path / "nlas" / "tiny-nla")
    verify(out)
    head = out / "ar" / "value_head.safetensors"
    data = bytearray(head.read_bytes())
    data[-1] ^= 0xFF
    head.write_bytes(bytes(data))
    with pytest.raises(NLAError, match="sha256"):
        resolve("tiny-nla", tmp_path / "nlas")
    out2 = pack_nla(root, tmp_path / "nlas2" / "tiny-nla")
    (out2 / "av" / "extra.txt").write_text("not from the release")
    with pytest.raises(NLAError, match="does not list"):
        verify(out2)


def test_pack_refuses_merged_weights(tiny, tiny_store, tmp_path):
    merged = NLA.from_target(tiny, tiny_store.layer, injection_scale=10.0).save(tmp_path / "m")
    with pytest.raises(NLAError, match="merged weights"):
        pack_nla(merged, tmp_path / "out")


def test_describe_lists_files_and_the_recorded_table(adapter_nla, tmp_path):
    from nlakit.nla.pretrained import describe

    root, _ = adapter_nla
    (tmp_path / "eval.txt").write_text("method nla fve_nrm +0.123\n")
    pack_nla(root, tmp_path / "nlas" / "tiny-nla", provenance={"eval.txt": tmp_path / "eval.txt"})
    text = describe("tiny-nla", tmp_path / "nlas")
    assert "every sha256 checked" in text and "fve_nrm +0.123" in text
    with pytest.raises(NLAError, match="no shipped NLA named"):
        describe("other", tmp_path / "nlas")


@pytest.mark.slow
def test_the_shipped_smollm2_nla_loads_by_name_and_explains():
    """The NLA in the package: its files match the manifest, it loads by name over the
    embedded model, and it states the current token of a text it explains."""
    from nlakit.nla.pretrained import SHIPPED_ROOT

    assert "smollm2-135m" in shipped_names()
    manifest = verify(SHIPPED_ROOT / "smollm2-135m")
    size = sum((SHIPPED_ROOT / "smollm2-135m" / rel).stat().st_size for rel in manifest["files"])
    assert size < 40 * 2**20  # the package's budget for it: rank-32 float16 adapters, 33 MiB
    nla = NLA.load("smollm2-135m")
    assert nla.layer == 10 and nla.ar.template == "{explanation}"
    (row,) = nla.explain_text("The assignment statement evaluates the expression list and",
                              positions="last", max_new_tokens=40, verify=True)
    assert row.explanation.startswith("Current token: ")
    assert -4.0 <= row.fve_nrm <= 1.0
    stated = row.explanation.split("'")[1]  # Current token: '<this>'.
    assert row.claims["current_token_right"] == float(stated == " and")
    assert row.verification.splitlines()[0].endswith(f"current token {stated!r}" + (
        "" if stated == " and" else " (real: ' and')"))


@pytest.mark.slow
def test_the_shipped_nla_exports_in_the_official_contract(tmp_path):
    """`nlakit export --nla smollm2-135m --layout official` meets the official client's
    load-time rules (it once failed its BOS rule), and its critic reads nlakit's AR tokens."""
    from nlakit.run.cli import main
    from official_contract import check_official_pair, official_ar_ids

    out = tmp_path / "official"
    assert main(["export", "--nla", "smollm2-135m", "--layout", "official",
                 "--out", str(out)]) == 0
    check_official_pair(out / "av", out / "ar")
    import yaml

    for half in ("av", "ar"):  # its sidecars predate `stage`; its provenance records RL
        assert yaml.safe_load((out / half / "nla_meta.yaml").read_text())["stage"] == "rl"
    nla = NLA.load("smollm2-135m")
    text = "Current token: ' and'\nEnding: the expression list and"
    assert official_ar_ids(out / "ar", text) == nla.ar.encode([text])["input_ids"][0].tolist()
    exported = NLA.load(av=out / "av", ar=out / "ar")
    torch.testing.assert_close(exported.reconstruct([text, "x"]), nla.reconstruct([text, "x"]),
                               atol=2e-3, rtol=1e-3)
