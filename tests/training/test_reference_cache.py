"""The reference cache key is stable and changes with every input that changes the numbers; files are atomic."""

from __future__ import annotations

import shutil

import torch

from open_instruct.training import reference_cache as rc


def records(**change):
    r = {
        "index": 0,
        "chosen_input_ids": [1, 2, 3],
        "chosen_labels": [-100, 2, 3],
        "rejected_input_ids": [1, 2, 4],
        "rejected_labels": [-100, 2, 4],
    }
    r.update(change)
    return [r]


def key(model_dir, revision=None, recs=None, precision="no"):
    return rc.fingerprint(
        {
            "model": rc.model_fingerprint(str(model_dir), revision),
            "data": rc.dataset_fingerprint(recs or records()),
            "mixed_precision": precision,
        }
    )


def test_key_is_stable(tiny_model_dir):
    assert key(tiny_model_dir) == key(tiny_model_dir)


def test_key_changes_with_each_input(tiny_model_dir, tmp_path):
    base = key(tiny_model_dir)
    assert key("org/model") != key("org/model", revision="v2")
    assert key(tiny_model_dir, recs=records(index=1)) != base  # the mix (row order / sampling)
    assert key(tiny_model_dir, recs=records(chosen_input_ids=[1, 2, 5])) != base  # data, template, tokenizer
    assert key(tiny_model_dir, recs=records(chosen_labels=[-100, -100, 3])) != base  # label boundary, truncation
    assert key(tiny_model_dir, precision="bf16") != base
    # Different weights in an otherwise identical folder.
    from transformers import AutoModelForCausalLM

    other = tmp_path / "model"
    shutil.copytree(tiny_model_dir, other)
    model = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    model.save_pretrained(other)
    assert key(other) != base


def test_save_load_roundtrip_and_rejects_mismatch(tmp_path):
    table = torch.randn(5, rc.COLUMNS)
    ref = rc.ReferenceLogps.from_tensor(table)
    path = rc.cache_file(tmp_path, "abc")
    rc.save(path, "abc", ref)
    assert [p.name for p in tmp_path.iterdir()] == ["abc.pt"]  # no temporary left behind
    loaded = rc.load(path, "abc", 5)
    assert torch.equal(loaded.as_tensor(), table)
    assert rc.load(path, "other-key", 5) is None
    assert rc.load(path, "abc", 6) is None
    path.write_bytes(path.read_bytes()[:50])  # truncated
    assert rc.load(path, "abc", 5) is None


def test_lookup_sums_and_means():
    ref = rc.ReferenceLogps.from_tensor(
        torch.tensor([[-10.0, 5, -12.0, 4, -9.0, -11.0], [-3.0, 1, -6.0, 3, -3.0, -2.5]])
    )
    chosen, rejected = ref.lookup(torch.tensor([1, 0]), length_normalized=False)
    assert chosen.tolist() == [-3.0, -10.0] and rejected.tolist() == [-6.0, -12.0]
    chosen, rejected = ref.lookup(torch.tensor([1, 0]), length_normalized=True)
    assert chosen.tolist() == [-3.0, -2.0] and rejected.tolist() == [-2.0, -3.0]
    # LD-DPO: shared + alpha * (sum - shared); without ld_alpha the plain sums
    chosen, rejected, n_c, n_r = ref.pair_sums(torch.tensor([1, 0]), ld_alpha=0.5)
    assert chosen.tolist() == [-3.0, -9.5] and rejected.tolist() == [-4.25, -11.5]
    assert n_c.tolist() == [1.0, 5.0] and n_r.tolist() == [3.0, 4.0]
    assert ref.pair_sums(torch.tensor([1, 0]))[0].tolist() == [-3.0, -10.0]


def test_old_format_is_rebuilt_with_the_reason(tmp_path):
    path = rc.cache_file(tmp_path, "abc")
    rc.save(path, "abc", rc.ReferenceLogps.from_tensor(torch.randn(3, rc.COLUMNS)))
    payload = torch.load(path, weights_only=True)
    payload["version"] = 2
    torch.save(payload, path)
    cached, problem = rc.check(path, "abc", 3)
    assert cached is None
    assert (
        problem == "written in cache format version 2, this version reads 3 (which adds LD-DPO's shared-length sums)"
    )
