"""Sharded training ingest (training/shards.py, batches.py): each rank reads only its block, the
epoch order is a keyed permutation evaluated per rank, and W ranks see the global batches of one
process. The end-to-end proof (gradients and epochs on 2 gloo workers reading through
``read_shard``) is tests/training/test_exactness.py."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ray_pinet.errors import DataError
from ray_pinet.keyed_random import permute, stream_key
from ray_pinet.training import exactness as ex
from ray_pinet.training.batches import RowSubset, TrainRows, epoch_batches, local_epoch_batches, num_steps
from ray_pinet.training.shards import plan, read_shard, shard_range

P = ex.Problem(num_rows=157, max_len=6)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 16, 17, 127, 128, 1000, 4099])
def test_permute_is_a_permutation_of_0_to_n(n):
    key = stream_key(0, 11, 3)
    pos = permute(key, np.arange(n), n)
    assert sorted(pos.tolist()) == list(range(n))
    # evaluated piecewise (any subset of indices) it gives the same positions
    idx = np.arange(n)[::3]
    assert np.array_equal(permute(key, idx, n), pos[idx])


def test_permute_depends_on_the_key_and_shuffles():
    n = 10_000
    a, b = permute(stream_key(0, 11, 0), np.arange(n), n), permute(stream_key(0, 11, 1), np.arange(n), n)
    assert not np.array_equal(a, b)
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.05  # no trace of the input order
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.05  # epochs are independent orders
    # displacement |pi(j) - j| of a uniform permutation averages n/3
    assert abs(np.abs(a - np.arange(n)).mean() / n - 1 / 3) < 0.02
    with pytest.raises(ValueError):
        permute(stream_key(0), np.array([n]), n)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_ranks_shares_of_each_global_batch_make_the_one_process_batch(world):
    n, B = 157, 16
    whole = list(epoch_batches(n, B, seed=4, epoch=2))
    assert len(whole) == num_steps(n, B) and all(len(b) == B for b in whole[:-1])
    assert sorted(torch.cat(whole).tolist()) == list(range(n))
    shares = []
    for r in range(world):
        lo, hi = shard_range(n, r, world)
        ids = np.arange(lo, hi)
        shares.append(list(local_epoch_batches(ids, ids, n, B, seed=4, epoch=2)))
        assert len(shares[-1]) == len(whole)  # every rank runs every step
    for b, batch in enumerate(whole):
        got = torch.cat([shares[r][b] for r in range(world)])
        assert sorted(got.tolist()) == sorted(batch.tolist())
        # and in the one-process order: each rank's share is the global batch restricted to it
        for r in range(world):
            lo, hi = shard_range(n, r, world)
            assert shares[r][b].tolist() == [i for i in batch.tolist() if lo <= i < hi]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_a_subset_is_batched_as_one_process_batches_it(world):
    """``data.train_strata``: the subset's dense index is rank-major (blocks are in id order)."""
    n, B = 157, 8
    subset = np.flatnonzero(np.random.default_rng(0).random(n) < 0.3)
    whole = list(epoch_batches(n, B, seed=1, epoch=0, ids=subset))
    offset, shares = 0, []
    for r in range(world):
        lo, hi = shard_range(n, r, world)
        local = subset[(subset >= lo) & (subset < hi)]
        s = RowSubset(local_ids=local, offset=offset, total=len(subset))
        offset += len(local)
        shares.append(list(local_epoch_batches(s.local_ids, s.offset + np.arange(len(local)), s.total, B, 1, 0)))
    for b, batch in enumerate(whole):
        assert torch.cat([shares[r][b] for r in range(world)]).sort().values.tolist() == sorted(batch.tolist())


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return tmp_path_factory.mktemp("shards"), ex.synthetic_train_table(P)


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_read_shard_gives_each_rank_its_block_from_its_row_groups_only(split, world):
    tmp, table = split
    root = ex.write_train_split(P, tmp / f"w{world}", files=4, row_group_rows=10)
    files = sorted((tmp / f"w{world}" / "train").glob("part-*.parquet"))
    groups = sum(pq.ParquetFile(f).metadata.num_row_groups for f in files)
    got, planned = [], 0
    for r in range(world):
        part, total = read_shard(root, "train", r, world)
        lo, hi = shard_range(P.num_rows, r, world)
        assert total == P.num_rows
        assert part.column("sample_id").to_pylist() == list(range(lo, hi))
        planned += sum(len(g) for _, g in plan(files, lo, hi))
        got.append(part)
    assert pa.concat_tables(got).equals(table)
    # row groups are read once, but for the at most W-1 that straddle two blocks
    assert groups <= planned <= groups + world - 1


def test_read_shard_refuses_a_split_whose_ids_are_not_dense(split, tmp_path):
    _, table = split
    (tmp_path / "train").mkdir()
    ids = table.column("sample_id").to_numpy().copy()
    ids[40] = 41  # id 40 missing, 41 twice
    bad = table.set_column(0, "sample_id", pa.array(ids, pa.int64()))
    pq.write_table(bad, tmp_path / "train" / "part-00000.parquet", row_group_size=16)
    with pytest.raises(DataError) as err:
        read_shard(tmp_path, "train", 0, 2)
    assert err.value.column == "sample_id" and err.value.value == 40 and "train" in err.value.file
    read_shard(tmp_path, "train", 1, 2)  # the other block is intact


def test_train_rows_hold_the_literal_padded_windows(split):
    """inputs / targets / negatives of TrainRows equal a literal per-row construction."""
    _, table = split
    rows = TrainRows(ex.shard(table, 1, 3), P.max_len, P.num_rows, 2)
    lo, hi = shard_range(P.num_rows, 1, 3)
    assert rows.first == lo and len(rows) == hi - lo
    L = P.max_len
    for i, sid in enumerate(range(lo, hi)):
        seq = table.column("seq")[sid].as_py()[-(L + 1):]
        negs = np.asarray(table.column("neg")[sid].as_py()).reshape(len(table.column("seq")[sid].as_py()) - 1, 2)
        want_in = [0] * (L + 1 - len(seq)) + seq[:-1]
        want_tg = [0] * (L + 1 - len(seq)) + seq[1:]
        assert rows.inputs[i].tolist() == want_in[-L:]
        assert rows.targets[i].tolist() == want_tg[-L:]
        k = len(seq) - 1
        assert rows.negs[i, L - k:].tolist() == negs[-k:].tolist() and not rows.negs[i, : L - k].any()
    batch = rows.take(torch.tensor([lo + 2, 0, hi]))  # ids of other ranks are not this rank's
    assert batch.sample_id.tolist() == [lo + 2] and batch.inputs.dtype == torch.int64


def test_train_rows_built_in_chunks_equal_one_chunk(split, monkeypatch):
    import ray_pinet.training.batches as batches

    _, table = split
    whole = TrainRows(table, P.max_len, P.num_rows, 2)
    monkeypatch.setattr(batches, "BUILD_ROWS", 7)  # many chunks, the last one short
    chunked = TrainRows(table, P.max_len, P.num_rows, 2)
    for name in ("inputs", "targets", "negs", "stratum", "sample_id"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name)), name
    assert np.array_equal(whole.lengths, chunked.lengths)
