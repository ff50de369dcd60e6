"""score() on a CPU when the prepared queries do not fit the budget: the layers a group at a time, every
query in each, the passes over the data run once and kept on disk (source_fast._replay). The scores must
be those of one block holding every query (float64: the same arithmetic in another order, so 1e-10),
the training data and the queries read once per checkpoint, and nothing left on disk."""

import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import source_fast as sf
import source_fast._replay as replay
import source_fast.scoring as scoring
from _helpers import CountingData, LeavesOutClass2, Stream, classification_data, mlp, perturbed_states
from source_fast.capture import tracked_layers
from source_fast.scoring import _query_bytes, layer_groups
from source_fast.tasks import ClassificationTask, CausalLMTask

RTOL = 1e-10
BIG = 1 << 40  # a budget every query fits in: one block, no cache


def _close(actual, expected, rtol=RTOL):
    scale = expected.abs().max()
    assert scale > 0
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"max|Δ| = {err:.3g}, scale {scale:.3g}, rtol {rtol}"


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _trajectory(method, model, data):
    ckpts = perturbed_states(model, 4, scale=0.2)
    if method in ("ekfac", "grad_dot"):
        return sf.Trajectory([sf.Segment(ckpts[-1:], data, lr_sum=2.0)])
    return sf.Trajectory([sf.Segment(ckpts[:2], data, lr_sum=1.5, weight_decay=1e-3),
                          sf.Segment(ckpts[2:], data, lr_sum=2.0)])


@pytest.mark.parametrize("method", ["source", "fast_source", "ekfac", "tracin", "grad_dot"])
@pytest.mark.parametrize("option", [{}, {"per_module": True}, {"per_token": True}, {"query_rank": 2}])
def test_layer_groups_give_one_blocks_scores_from_one_read(method, option, monkeypatch, tmp_path):
    model = _model()
    task = ClassificationTask()
    data, queries = classification_data(37, 6, 3, seed=1), classification_data(11, 6, 3, seed=2)
    traj = _trajectory(method, model, data)
    factors = sf.fit_factors(model, task, traj, average_params=method == "fast_source", batch_size=8) if method in (
        "source", "fast_source", "ekfac") else None
    damping = {"damping": 0.05} if method == "ekfac" else {}
    # One block holding every query reads each once per checkpoint, as the layer groups must.
    once_data, once_queries = CountingData(data), CountingData(queries)
    whole = sf.score(model, task, traj, factors, once_data, once_queries, method=method, batch_size=8,
                     query_memory_budget=BIG, train_segments="all", **damping, **option)
    specs = tracked_layers(model, None)
    segments = list(range(len(traj.segments)))
    full = _query_bytes(model, traj, method, segments, None)
    if "query_rank" in option:
        # Two low-rank queries per block; the groups are sized at full rank (how the queries are prepared,
        # before their SVD): every module's queries in blocks of them.
        budget = 2 * sum(map(_query_bytes(model, traj, method, segments, option["query_rank"]), specs))
        turns = layer_groups(specs, len(queries), full, budget)
        assert all(len(rows) < len(queries) for rows, _ in turns)
    else:  # every query at the largest layer only: three groups, one layer each
        budget = len(queries) * max(map(full, specs))
        turns = layer_groups(specs, len(queries), full, budget)
        assert len(turns) == 3
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the passes go
    caches = []
    monkeypatch.setattr(scoring, "PassCache", lambda *args: caches.append(replay.PassCache(*args)) or caches[-1])
    counted_data, counted_queries = CountingData(data), CountingData(queries)
    grouped = sf.score(model, task, traj, factors, counted_data, counted_queries, method=method, batch_size=8,
                       query_memory_budget=budget, train_segments="all", **damping, **option)
    if isinstance(whole, dict):
        assert grouped.keys() == whole.keys()
        for name in whole:
            _close(grouped[name], whole[name])
    else:
        assert grouped.shape == whole.shape
        _close(grouped, whole)
    assert len(caches) == 1 and caches[0].bytes_written > 0
    passes = 1 if method in ("ekfac", "grad_dot", "fast_source") else 4
    assert once_data.reads >= passes * len(data)
    assert counted_data.reads == once_data.reads
    # The queries: each block of them read once (all of them at once where no module's queries need blocks).
    query_passes = 4 if method == "tracin" else 1
    checks = once_queries.reads - query_passes * len(queries)
    blocks = {(rows.start, rows.stop) for rows, _ in turns}
    assert counted_queries.reads == checks + query_passes * sum(stop - start for start, stop in blocks)
    assert list(tmp_path.iterdir()) == []  # the passes' files are gone


def test_a_module_whose_queries_do_not_fit_goes_in_blocks_of_them():
    model = _model()
    specs = tracked_layers(model, None)
    sizes = {s.name: s.d_out * s.d_a * 8 for s in specs}  # 0: 9 × 7, 2: 7 × 10, 4: 3 × 8 (float64)
    budget = 11 * sizes["0"]
    turns = layer_groups(specs, 11, lambda s: sizes[s.name], budget)
    # Layer 2's 11 queries take more: blocks of 9 and 2. Layer 0 fills a group; layer 4 goes in the next.
    assert [(t.start, t.stop, [s.name for s in group]) for t, group in turns] == [
        (0, 9, ["2"]), (9, 11, ["2"]), (0, 11, ["0"]), (0, 11, ["4"])]


def test_a_grouped_convolutions_groups_stay_in_one_group():
    """Its heuristic damping is its module's mean Λ, and per-module scores the sum of its groups."""
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Flatten(), nn.Linear(6 * 4, 3))
    specs = tracked_layers(model, None)
    assert [s.module for s in specs] == ["0", "0", "2"]
    turns = layer_groups(specs, 3, lambda s: 1, 2 * 3)
    assert [[s.name for s in group] for _, group in turns] == [[specs[0].name, specs[1].name], ["2"]]


def test_gpt2_with_padding_scores_the_same_in_layer_groups(monkeypatch, tmp_path):
    """A Hugging Face GPT-2 with right-padded sequences: the masks travel with the kept passes."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=12, n_layer=2, n_head=2, vocab_size=29, n_positions=12, bos_token_id=0,
                                  eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    g = torch.Generator().manual_seed(0)

    def tokens(n):
        ids = torch.randint(1, 29, (n, 9), generator=g)
        mask = (torch.arange(9)[None] < torch.randint(3, 10, (n, 1), generator=g)).long()
        return [{"input_ids": i * m, "attention_mask": m} for i, m in zip(ids, mask)]

    data, queries = tokens(13), tokens(6)
    task = CausalLMTask()
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, task, traj, batch_size=4)
    whole = sf.score(model, task, traj, factors, data, queries, method="ekfac", batch_size=4, per_token=True,
                     query_memory_budget=BIG)
    specs = tracked_layers(model, task.get_influence_tracked_modules())
    one_query = sum(s.d_out * s.d_a for s in specs) * 8
    assert len(layer_groups(specs, len(queries), lambda s: s.d_out * s.d_a * 8, 2 * one_query)) > 2
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    grouped = sf.score(model, task, traj, factors, data, queries, method="ekfac", batch_size=4, per_token=True,
                       query_memory_budget=2 * one_query)
    assert grouped.shape == whole.shape
    _close(grouped, whole)
    assert list(tmp_path.iterdir()) == []


def test_no_room_on_disk_goes_back_to_blocks_of_queries(monkeypatch, tmp_path):
    model = mlp(4, 5, 3)
    data, queries = classification_data(30, 4, 3, seed=1), classification_data(4, 4, 3, seed=2)
    task = ClassificationTask()
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, task, traj)
    whole = sf.score(model, task, traj, factors, data, queries, method="ekfac", query_memory_budget=BIG)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(replay, "DISK_MARGIN", 1 << 62)  # no disk has that much free
    counted = CountingData(data)
    with pytest.warns(UserWarning, match=r"score: no disk space to keep the passes over the data \(.* has \d+ bytes "
                                         r"free; this pass needs about \d+ more; .*the queries go in 4 blocks instead"):
        blocks = sf.score(model, task, traj, factors, counted, queries, method="ekfac", query_memory_budget=43 * 8)
    _close(blocks, whole)
    assert list(tmp_path.iterdir()) == []
    # The first, abandoned pass read one batch; then one pass per block.
    assert counted.reads > 4 * len(data)


def test_an_error_in_a_later_pass_leaves_nothing_on_disk(monkeypatch, tmp_path):
    """A training example that fails once the first group's passes are kept: its error, named, and the
    passes' folder removed."""
    model = mlp(4, 5, 3)
    data, queries = classification_data(30, 4, 3, seed=1), classification_data(4, 4, 3, seed=2)
    task = ClassificationTask()
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, task, traj)

    class FailsLate(torch.utils.data.Dataset):
        reads = 0

        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            FailsLate.reads += 1
            if FailsLate.reads > 4 + 8 + 20:  # past the checks, in the scoring pass
                raise OSError("disk read failed")
            return data[i]

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(OSError, match="disk read failed"):
        sf.score(model, task, traj, factors, FailsLate(), queries, method="ekfac", query_memory_budget=43 * 8)
    assert list(tmp_path.iterdir()) == []


def _queries_1_and_4_without_gradient():
    """Six queries of classes 0, 2, 1, 0, 2, 1, scored by LeavesOutClass2: queries 1 and 4 have no gradient."""
    model = mlp(4, 5, 3)
    data, queries = classification_data(20, 4, 3), classification_data(6, 4, 3, seed=1)
    queries.tensors[1][:] = torch.tensor([0, 2, 1, 0, 2, 1])
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, ClassificationTask(), traj)
    return model, data, queries, traj, factors


def test_queries_without_gradient_are_named_once_by_their_number(monkeypatch, tmp_path):
    model, data, queries, traj, factors = _queries_1_and_4_without_gradient()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # Layer 0 takes 6 × 25 × 8 bytes: groups of one layer, each seeing queries 1 and 4 without gradient.
    with pytest.warns(UserWarning, match=r"queries: 2 of 6 have a measurement with no gradient") as said:
        sf.score(model, LeavesOutClass2(), traj, factors, data, queries, method="ekfac",
                 query_memory_budget=6 * 25 * 8)
    assert len([w for w in said if "no gradient" in str(w.message)]) == 1
    assert "(numbers [1, 4])" in str(said[0].message)


def test_the_passes_folder_is_marked_as_ours():
    cache = replay.PassCache([])
    try:
        assert cache.folder.name.startswith("source_fast_passes.sf-")
        assert Path(cache.folder).parent == Path(tempfile.gettempdir())
    finally:
        cache.close()
    assert not cache.folder.exists()


def test_a_stream_of_training_examples_scores_the_same_in_layer_groups(monkeypatch, tmp_path):
    """A stream is scored in buffered pieces: each piece's passes are kept and replayed in turn."""
    model = _model()
    task = ClassificationTask()
    data, queries = classification_data(23, 6, 3, seed=1), classification_data(5, 6, 3, seed=2)
    traj = _trajectory("source", model, data)
    factors = sf.fit_factors(model, task, traj, batch_size=8)
    whole = sf.score(model, task, traj, factors, data, queries, batch_size=4, query_memory_budget=BIG)
    monkeypatch.setattr(scoring, "STREAM_CHUNK", 10)  # three pieces
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    specs = tracked_layers(model, None)
    budget = len(queries) * max(map(_query_bytes(model, traj, "source", [0, 1], None), specs))
    streamed = sf.score(model, task, traj, factors, Stream(data), queries, batch_size=4, train_segments="all",
                        query_memory_budget=budget)
    _close(streamed, whole)
    assert list(tmp_path.iterdir()) == []


def test_in_blocks_of_queries_a_query_without_gradient_is_named_by_its_number_among_all(monkeypatch, tmp_path):
    """Blocks of queries (no disk room here; a GPU, ranks) warn block by block, numbering queries in the
    whole set, not in their block."""
    model, data, queries, traj, factors = _queries_1_and_4_without_gradient()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(replay, "DISK_MARGIN", 1 << 62)
    with pytest.warns(UserWarning) as said:
        sf.score(model, LeavesOutClass2(), traj, factors, data, queries, method="ekfac", query_memory_budget=2 * 43 * 8)
    named = [str(w.message) for w in said if "no gradient" in str(w.message)]
    assert [m.split("(numbers ")[1].split(")")[0] for m in named] == ["[1]", "[4]"]


def test_a_query_without_gradient_at_one_module_only_is_not_named(monkeypatch, tmp_path, recwarn):
    """Its scores come from the other modules: no warning, also when the module's queries go in blocks
    and the other module's in another turn."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, 3)).double()
    data, queries = classification_data(20, 4, 3), classification_data(6, 4, 3, seed=1)
    queries.tensors[0][1] = 0.0  # query 1: layer 0's input is 0 (its tile too), layer 2's bias column is not
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, ClassificationTask(), traj)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    specs = tracked_layers(model, None)
    budget = 900  # layer 0 takes 5 × 4 × 8 bytes a query: its six in blocks of 5 and 1; layer 2 (3 × 6) all six
    turns = layer_groups(specs, 6, lambda s: s.d_out * s.d_a * 8, budget)
    assert [(rows.start, rows.stop, [s.name for s in g]) for rows, g in turns] == [
        (0, 5, ["0"]), (5, 6, ["0"]), (0, 6, ["2"])]
    scores = sf.score(model, ClassificationTask(), traj, factors, data, queries, method="ekfac",
                      query_memory_budget=budget)
    assert (scores[1] != 0).any()
    assert not [w for w in recwarn if "no gradient" in str(w.message)]
