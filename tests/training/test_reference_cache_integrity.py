"""The reference cache records its key, sizes and a checksum; damaged or mismatched files are reported and rebuilt."""

from __future__ import annotations

import torch

from open_instruct.objectives.logprobs import SequenceLogprobs
from open_instruct.training import reference_cache
from open_instruct.training.reference_cache import ReferenceLogps


class _Accelerator:
    """Single-process stand-in: gather is the identity."""

    is_main_process = is_local_main_process = True
    num_processes = 1
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.printed: list[str] = []

    def gather(self, tensor):
        return tensor

    def print(self, text):
        self.printed.append(text)

    def wait_for_everyone(self):
        pass


def _reference(rows: int = 10) -> ReferenceLogps:
    g = torch.Generator().manual_seed(0)
    return ReferenceLogps(
        -torch.rand(rows, generator=g) * 50,
        torch.randint(1, 30, (rows,), generator=g).float(),
        -torch.rand(rows, generator=g) * 50,
        torch.randint(1, 30, (rows,), generator=g).float(),
        -torch.rand(rows, generator=g) * 20,
        -torch.rand(rows, generator=g) * 20,
    )


def test_whole_file_round_trips(tmp_path):
    path = tmp_path / "k.pt"
    ref = _reference()
    reference_cache.save(path, "k", ref)
    loaded, problem = reference_cache.check(path, "k", 10)
    assert problem == "" and torch.equal(loaded.as_tensor(), ref.as_tensor())
    payload = torch.load(path, weights_only=True)
    assert payload["sha256"] == __import__("hashlib").sha256(ref.as_tensor().numpy().tobytes()).hexdigest()
    assert (payload["rows"], payload["columns"], payload["nbytes"]) == (10, 6, 240)


def test_truncated_file_is_detected(tmp_path):
    path = tmp_path / "k.pt"
    reference_cache.save(path, "k", _reference())
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 0):
        path.write_bytes(data[:cut])
        loaded, problem = reference_cache.check(path, "k", 10)
        assert loaded is None and "unreadable" in problem and f"{cut} bytes" in problem


def test_altered_table_fails_the_checksum(tmp_path):
    path = tmp_path / "k.pt"
    reference_cache.save(path, "k", _reference())
    payload = torch.load(path, weights_only=True)
    payload["table"][3, 0] += 1e-3
    torch.save(payload, path)
    assert reference_cache.check(path, "k", 10) == (None, "checksum mismatch (the table was altered or damaged)")


def test_key_and_size_mismatches_are_named(tmp_path):
    path = tmp_path / "k.pt"
    reference_cache.save(path, "k", _reference())
    assert reference_cache.check(path, "other", 10)[1] == "its key does not match this model and data"
    assert "sizes do not match" in reference_cache.check(path, "k", 11)[1]
    assert reference_cache.check(tmp_path / "none.pt", "k", 10) == (None, "missing")


def test_damaged_cache_is_reported_and_rebuilt(tmp_path):
    rows, calls = 6, []
    expected = _reference(rows)

    def logprob_fn(model, batch):  # the "model": looks the answers up, and counts the calls
        calls.append(batch["index"].tolist())
        idx = batch["index"]
        return SequenceLogprobs(
            sums=torch.cat([expected.chosen_sums[idx], expected.rejected_sums[idx]]),
            counts=torch.cat([expected.chosen_counts[idx], expected.rejected_counts[idx]]).long(),
            token_logps=torch.zeros(0),
            token_seq=torch.zeros(0, dtype=torch.long),
        )

    loader = [{"index": torch.arange(0, 3)}, {"index": torch.arange(3, 6)}]
    model, accelerator = torch.nn.Linear(1, 1), _Accelerator()
    path = reference_cache.cache_file(tmp_path, "key")
    reference_cache.get_reference(model, loader, accelerator, logprob_fn, rows, str(tmp_path), "key")
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by a full disk or a copy cut short
    calls.clear()
    again = reference_cache.get_reference(model, loader, accelerator, logprob_fn, rows, str(tmp_path), "key")
    assert calls == [[0, 1, 2], [3, 4, 5]], "the damaged cache was used instead of rebuilt"
    assert any(
        f"reference cache {path} not used: unreadable" in line and "rebuilding" in line for line in accelerator.printed
    ), accelerator.printed
    # the stand-in log-probs have no per-token values, so only the sums and counts (columns 0-3) are rebuilt
    assert torch.equal(again.as_tensor()[:, :4], expected.as_tensor()[:, :4])
    assert reference_cache.check(path, "key", rows)[1] == ""
