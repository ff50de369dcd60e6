"""score() on a CPU when the prepared queries do not fit the budget: the layers a group at a time, every
query in each, the passes over the data run once and kept on disk (source_fast._replay). The scores must
be those of one block holding every query (float64: the same arithmetic in another order, so 1e-10),
the training data and the queries read once per checkpoint, and nothing left on disk."""

import os
import resource
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import source_fast as sf
import source_fast._replay as replay
import source_fast.scoring as scoring
from _helpers import (CountingData, LeavesOutClass2, PooledClassifier, Stream, classification_data, mlp,
                      perturbed_states)
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


def _fitted(method, n_train=37, n_query=11):
    """The MLP, its task, training data and queries, trajectory for `method` and factors (batches of 8)."""
    model = _model()
    task = ClassificationTask()
    data, queries = classification_data(n_train, 6, 3, seed=1), classification_data(n_query, 6, 3, seed=2)
    traj = _trajectory(method, model, data)
    return model, task, data, queries, traj, sf.fit_factors(model, task, traj, batch_size=8)


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
    monkeypatch.setattr(scoring, "PassCache", lambda *args, **kw: caches.append(replay.PassCache(*args, **kw)) or caches[-1])
    counted_data, counted_queries = CountingData(data), CountingData(queries)
    grouped = sf.score(model, task, traj, factors, counted_data, counted_queries, method=method, batch_size=8,
                       query_memory_budget=budget, train_segments="all", **damping, **option)
    if isinstance(whole, dict):
        assert list(grouped) == list(whole)
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
    caches = _caches(monkeypatch)
    grouped = sf.score(model, task, traj, factors, data, queries, method="ekfac", batch_size=4, per_token=True,
                       query_memory_budget=2 * one_query)
    assert [c.bytes_written > 0 for c in caches] == [True]  # the groups, not blocks of queries after NoRoom
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
    with pytest.warns(UserWarning, match=r"score: the disk cannot keep the passes over the data \(.* has \d+ bytes "
                                         r"free; the passes need about \d+ more; .*the queries go in 4 blocks instead"):
        blocks = sf.score(model, task, traj, factors, counted, queries, method="ekfac", query_memory_budget=43 * 8)
    _close(blocks, whole)
    assert list(tmp_path.iterdir()) == []
    # The first, abandoned pass read one batch; then one pass per block.
    assert counted.reads > 4 * len(data)


def test_an_error_in_a_later_pass_leaves_nothing_on_disk(monkeypatch, tmp_path):
    """A training example that fails once a training pass is kept (TracIn's second checkpoint): its error,
    named, and the passes' folder removed."""
    model = mlp(4, 5, 3)
    data, queries = classification_data(30, 4, 3, seed=1), classification_data(4, 4, 3, seed=2)
    traj = sf.Trajectory([sf.Segment(perturbed_states(model, 2, scale=0.2), data, lr_sum=1.0)])
    caches = _caches(monkeypatch)

    class FailsLate(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            if caches and any(key[0] == "train" for key in caches[0]._done):
                raise OSError("disk read failed")
            return data[i]

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(OSError, match="disk read failed"):
        sf.score(model, ClassificationTask(), traj, None, FailsLate(), queries, method="tracin",
                 train_segments="all", query_memory_budget=2 * 43 * 8)  # 2 checkpoints: 2 copies
    assert [key for key in caches[0]._done if key[0] == "train"] == [("train", 0)]
    assert list(tmp_path.iterdir()) == []


def _caches(monkeypatch) -> list:
    """The PassCaches made from now on (a cache that raised NoRoom is not one of them)."""
    made = []
    init = replay.PassCache.__init__

    def kept(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(replay.PassCache, "__init__", kept)
    return made


def test_the_disk_is_checked_for_all_of_a_rounds_training_passes_at_once(monkeypatch, tmp_path):
    """SOURCE over 2 segments of 2 checkpoints runs 4 training passes in the first round: with room for
    half of what the passes keep, NoRoom comes at the first training batch (not after 2 passes run for
    nothing), and blocks of queries give the scores."""
    model, task, data, queries, traj, factors = _fitted("source")
    whole = sf.score(model, task, traj, factors, data, queries, batch_size=8, query_memory_budget=BIG)
    specs = tracked_layers(model, None)
    budget = len(queries) * max(map(_query_bytes(model, traj, "source", [0, 1], None), specs))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    caches = _caches(monkeypatch)
    sf.score(model, task, traj, factors, data, queries, batch_size=8, query_memory_budget=budget)
    kept = caches[0].bytes_written
    free = replay.DISK_MARGIN + kept // 2
    monkeypatch.setattr(replay.shutil, "disk_usage", lambda path: type("Usage", (), {"free": free})())
    with pytest.warns(UserWarning, match="the disk cannot keep the passes"):
        blocks = sf.score(model, task, traj, factors, data, queries, batch_size=8, query_memory_budget=budget)
    _close(blocks, whole)
    assert len(caches) == 2 and not [key for key in caches[1]._done if key[0] == "train"]
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


class LeavesOutPredicted2(ClassificationTask):
    """A measurement that leaves out the queries the model predicts as class 2: which ones depends on the
    checkpoint."""

    def compute_measurement(self, batch, model):
        x, y = batch
        out = model(x)
        keep = out.argmax(1) != 2
        return nn.functional.cross_entropy(out[keep], y[keep], reduction="sum")


def test_tracin_names_a_query_only_if_it_has_no_gradient_at_every_checkpoint():
    """At checkpoint 0 the model predicts class 2 for every query (no gradient anywhere), at checkpoint 1
    for some: those alone score 0, one warning names them (not one per checkpoint naming all)."""
    model, data, queries, _, _ = _queries_1_and_4_without_gradient()
    with torch.no_grad():  # raise class 2's bias at the last checkpoint until three queries predict it
        out = model(queries.tensors[0])
        short = (torch.cat([out[:, :2], out[:, 3:]], 1).amax(1) - out[:, 2]).sort().values
        model[2].bias[2] += (short[2] + short[3]) / 2
        zero = (model(queries.tensors[0]).argmax(1) == 2).nonzero().flatten().tolist()
    assert len(zero) == 3
    late = {k: v.clone() for k, v in model.state_dict().items()}
    early = {k: v.clone() for k, v in late.items()}
    early["2.bias"][2] += 1e3
    traj = sf.Trajectory([sf.Segment([early, late], data, lr_sum=1.0)])
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        scores = sf.score(model, LeavesOutPredicted2(), traj, None, data, queries, method="tracin")
    named = [str(w.message) for w in said if "no gradient" in str(w.message)]
    assert len(named) == 1 and f"queries: {len(zero)} of 6 have" in named[0] and f"(numbers {zero})" in named[0]
    assert (scores[zero] == 0).all() and (scores.abs().amax(1) > 0).sum() == len(queries) - len(zero)


def test_the_passes_folder_is_marked_as_ours():
    cache = replay.PassCache([])
    try:
        assert cache.folder.name.startswith("source_fast_passes.sf-")
        assert Path(cache.folder).parent == Path(tempfile.gettempdir())
    finally:
        cache.close()
    assert not cache.folder.exists()


def test_the_folder_of_a_process_killed_outright_goes_with_the_next_cache(tmp_path):
    """A SIGKILLed score_corpus job cannot remove its passes (a shard's layer tokens, gigabytes): the next
    cache removes this host's folders whose file no process holds locked and whose number runs no process,
    and nothing else. A running process whose number is not ours to see (another PID namespace: a
    container sharing /tmp and the host name) holds its lock: here a child holds it under a number that
    ended. A running cache of an earlier version took no lock: its number runs."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    host = socket.gethostname()
    names = {
        "dead": f"source_fast_passes.sf-{ended.pid}-{host}-abcd1234",
        "dead, a number too large for a process": f"source_fast_passes.sf-{10**20}-{host}-abcd1234",
        "dead, a digit that is not ASCII": f"source_fast_passes.sf-\u00b2-{host}-abcd1234",
        "live, in another PID namespace": f"source_fast_passes.sf-{ended.pid}-{host}-efgh5678",
        "live, of an earlier version": f"source_fast_passes.sf-{os.getpid()}-{host}-mnop3456",
        "another host's": f"source_fast_passes.sf-{ended.pid}-{host}-2-abcd1234",
        "unnumbered": "source_fast_passes.sf-abcd1234",
        "without its file yet": f"source_fast_passes.sf-{ended.pid}-{host}-ijkl9012",
    }
    for what, name in names.items():
        (tmp_path / name).mkdir()
        if what != "without its file yet":
            (tmp_path / name / "passes.bin").write_bytes(b"tokens")
    live = tmp_path / names["live, in another PID namespace"] / "passes.bin"
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'rb'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
                               str(live)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        cache = replay.PassCache([], directory=str(tmp_path))
        assert cache.folder.name.startswith(f"source_fast_passes.sf-{os.getpid()}-{host}-")
        again = replay.PassCache([], directory=str(tmp_path))  # a live cache's folder stays too
        assert cache.folder.exists()
        cache.close()
        again.close()
    finally:
        holder.stdin.close()
        holder.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(v for k, v in names.items() if "dead" not in k)


def test_a_dataloader_worker_forked_during_a_pass_does_not_keep_the_passes(tmp_path):
    """A persistent worker forked while the cache's file is open does not hold it: once the cache is
    closed, the file's space (memory, on a tmpfs) and lock are free although the worker lives on."""
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=4, num_workers=1, persistent_workers=True,
                                         multiprocessing_context="fork")
    with replay.PassCache([], directory=str(tmp_path)) as cache:
        cache._write(torch.arange(1000.0))
        cache._file.flush()
        assert [int(b.sum()) for b in loader] == [6, 22]  # the worker forks here
        passes = os.path.realpath(cache.folder / "passes.bin")
    worker = loader._iterator._workers[0]
    assert worker.is_alive()
    held = [os.readlink(f"/proc/{worker.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{worker.pid}/fd")]
    assert all(not link.startswith(passes) for link in held), held
    assert not cache.folder.exists()
    del loader  # its worker ends


@pytest.mark.parametrize("failure", [PermissionError, RuntimeError])
def test_a_failure_tidying_up_after_killed_processes_still_gives_a_cache(failure, tmp_path, monkeypatch):
    """Tidying up is best effort: whatever it raises (a folder it may not read, a bug), not NoRoom."""
    dead = tmp_path / f"source_fast_passes.sf-{10**8}-{socket.gethostname()}-abcd1234"  # no such process
    dead.mkdir()
    (dead / "passes.bin").write_bytes(b"tokens")

    def fails(*args):
        raise failure("cannot look")

    monkeypatch.setattr(replay.os, "open", fails)
    with replay.PassCache([], directory=str(tmp_path)) as cache:
        assert cache.folder.exists() and dead.exists()


def test_an_interrupt_tidying_up_leaves_no_folder_of_the_new_cache(tmp_path, monkeypatch):
    dead = tmp_path / f"source_fast_passes.sf-{10**8}-{socket.gethostname()}-abcd1234"  # no such process
    dead.mkdir()
    (dead / "passes.bin").write_bytes(b"tokens")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(replay.os, "open", interrupted)
    with pytest.raises(KeyboardInterrupt):
        replay.PassCache([], directory=str(tmp_path))
    assert list(tmp_path.iterdir()) == [dead]


def _stat_says_in_memory(path) -> bool:
    kind = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True).stdout
    return kind.strip() in ("tmpfs", "ramfs")


def test_the_file_system_is_read_from_the_mounts(tmp_path):
    """Against coreutils' stat (statfs) on a tmpfs (/dev/shm, on the Linux machines this runs on), the test's
    disk folder and the root."""
    assert _stat_says_in_memory("/dev/shm")
    for path in ("/dev/shm", tmp_path, "/"):
        assert (replay._file_system(path) in ("tmpfs", "ramfs")) == _stat_says_in_memory(path), path


@pytest.mark.parametrize("where", ["in memory", "on disk"])
def test_passes_in_memory_leave_half_of_it_to_the_scoring(where, monkeypatch, tmp_path):
    """A TMPDIR on tmpfs keeps the passes in RAM: with 2 GiB available (half of it for the passes, less
    the 1 GiB margin: nothing) they are not kept, and blocks of queries give the scores; a disk's free
    space is what counts on a disk."""
    model, task, data, queries, traj, factors = _fitted("ekfac")
    whole = sf.score(model, task, traj, factors, data, queries, method="ekfac", damping=0.05, batch_size=8,
                     query_memory_budget=BIG)
    specs = tracked_layers(model, None)
    budget = len(queries) * max(map(_query_bytes(model, traj, "ekfac", [0], None), specs))
    folder = Path(tempfile.mkdtemp(dir="/dev/shm")) if where == "in memory" else tmp_path
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setattr(replay, "available_memory", lambda device: 2 * replay.DISK_MARGIN)
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            grouped = sf.score(model, task, traj, factors, data, queries, method="ekfac", damping=0.05, batch_size=8,
                               query_memory_budget=budget)
        assert list(folder.iterdir()) == []
    finally:
        if where == "in memory":
            folder.rmdir()
    _close(grouped, whole)
    refused = [str(w.message) for w in said if "disk cannot" in str(w.message)]
    assert len(refused) == (where == "in memory")
    assert all("is on a tmpfs, in memory: the passes may take 1073741824 bytes" in m for m in refused)


def test_a_folder_removed_while_its_cache_runs_is_still_read(monkeypatch, tmp_path):
    """Another process that takes the folder for a dead one's (a bug, or a person) removes its name only:
    the later groups replay the passes through the file the cache holds open, and score as one block."""
    model, task, data, queries, traj, factors = _fitted("ekfac")
    whole = sf.score(model, task, traj, factors, data, queries, method="ekfac", damping=0.05, batch_size=8,
                     query_memory_budget=BIG)
    specs = tracked_layers(model, None)
    budget = len(queries) * max(map(_query_bytes(model, traj, "ekfac", [0], None), specs))
    begin = replay.PassCache.round
    rounds = []

    def round_removing_the_folder(self, *args, **kwargs):
        rounds.append(args[0])
        if len(rounds) == 2:
            replay.shutil.rmtree(self.folder)
        begin(self, *args, **kwargs)

    monkeypatch.setattr(replay.PassCache, "round", round_removing_the_folder)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    grouped = sf.score(model, task, traj, factors, data, queries, method="ekfac", damping=0.05, batch_size=8,
                       query_memory_budget=budget)
    assert len(rounds) > 2
    _close(grouped, whole)


def test_a_stream_of_training_examples_scores_the_same_in_layer_groups(monkeypatch, tmp_path):
    """A stream is scored in buffered pieces: each piece's passes are kept and replayed in turn."""
    model, task, data, queries, traj, factors = _fitted("source", 23, 5)
    whole = sf.score(model, task, traj, factors, data, queries, batch_size=4, query_memory_budget=BIG)
    monkeypatch.setattr(scoring, "STREAM_CHUNK", 10)  # three pieces
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    specs = tracked_layers(model, None)
    budget = len(queries) * max(map(_query_bytes(model, traj, "source", [0, 1], None), specs))
    once, counted = CountingData(data), CountingData(data)
    sf.score(model, task, traj, factors, Stream(once), queries, batch_size=4, train_segments="all",
             query_memory_budget=BIG)
    streamed = sf.score(model, task, traj, factors, Stream(counted), queries, batch_size=4, train_segments="all",
                        query_memory_budget=budget)
    _close(streamed, whole)
    assert list(tmp_path.iterdir()) == []
    # The later groups replay the pieces without reading the stream again (it may tokenise, or fetch).
    assert counted.reads == once.reads


def test_only_the_layers_of_later_groups_are_kept(monkeypatch, tmp_path):
    """The first group scores its layers as the passes run: writing them would only fill the disk."""
    model, task, data, queries, traj, factors = _fitted("ekfac")
    specs = tracked_layers(model, None)
    budget = len(queries) * max(map(_query_bytes(model, traj, "ekfac", [0], None), specs))
    assert [[s.name for s in g] for _, g in layer_groups(specs, 11, _query_bytes(model, traj, "ekfac", [0], None),
                                                         budget)] == [["0"], ["2"], ["4"]]
    caches = []
    monkeypatch.setattr(scoring, "PassCache", lambda *args, **kw: caches.append(replay.PassCache(*args, **kw)) or caches[-1])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    sf.score(model, task, traj, factors, data, queries, method="ekfac", damping=0.05, query_memory_budget=budget)
    # One pass over the training data and one over the queries, each example's inputs and output gradients
    # at layers 2 (9 in, 7 out) and 4 (7 in, 3 out), in float64; none of layer 0's.
    assert caches[0].bytes_written == (37 + 11) * (9 + 7 + 7 + 3) * 8


@pytest.mark.parametrize("query_rank", [None, 1])
def test_in_blocks_of_queries_queries_without_gradient_are_named_once_among_all(monkeypatch, tmp_path, query_rank):
    """Blocks of queries (no disk room here; a GPU, ranks), and query_rank's pieces of them, warn once for
    the whole call, numbering the queries in the whole set."""
    model, data, queries, traj, factors = _queries_1_and_4_without_gradient()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(replay, "DISK_MARGIN", 1 << 62)
    budget = 2 * 43 * 8 if query_rank is None else 1200  # blocks of 2 queries; of 6 in pieces of 1 (query_rank)
    with pytest.warns(UserWarning) as said:
        sf.score(model, LeavesOutClass2(), traj, factors, data, queries, method="ekfac", query_memory_budget=budget,
                 query_rank=query_rank)
    named = [str(w.message) for w in said if "no gradient" in str(w.message)]
    assert len(named) == 1 and "queries: 2 of 6 have" in named[0] and "(numbers [1, 4])" in named[0]


def _blocks_and_groups(model, data, queries, budget, tmp_path, monkeypatch, **options):
    """score() in one block, then with `budget` (layer groups), their scores, and the fallback warnings."""
    task = ClassificationTask()
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, task, traj)
    whole = sf.score(model, task, traj, factors, data, queries, method="ekfac", query_memory_budget=BIG, **options)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        grouped = sf.score(model, task, traj, factors, data, queries, method="ekfac", query_memory_budget=budget,
                           **options)
    return whole, grouped, [str(w.message) for w in said]


def test_a_write_the_disk_refuses_goes_back_to_blocks_of_queries(monkeypatch, tmp_path):
    """A quota or a file size limit (which the free space does not show) fails a write: blocks of queries
    instead, and the passes' folder removed. RLIMIT_FSIZE makes such a limit (Python ignores SIGXFSZ, so
    the write raises EFBIG)."""
    model = mlp(4, 5, 3)
    data, queries = classification_data(30, 4, 3, seed=1), classification_data(4, 4, 3, seed=2)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, hard))
    try:
        whole, grouped, said = _blocks_and_groups(model, data, queries, 43 * 8, tmp_path, monkeypatch)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    _close(grouped, whole)
    assert any("the disk cannot keep the passes" in m and "File too large" in m for m in said), said
    assert list(tmp_path.iterdir()) == []


def test_a_temp_directory_that_is_not_one_goes_back_to_blocks_of_queries(monkeypatch, tmp_path):
    model = mlp(4, 5, 3)
    data, queries = classification_data(30, 4, 3, seed=1), classification_data(4, 4, 3, seed=2)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    whole, grouped, said = _blocks_and_groups(model, data, queries, 43 * 8, not_a_folder, monkeypatch)
    _close(grouped, whole)
    assert any("no folder for them in" in m and "Not a directory" in m for m in said), said


def test_no_usable_temporary_directory_at_all_is_no_room(monkeypatch):
    """tempfile finds none (every candidate unwritable): NoRoom, not tempfile's own error."""
    monkeypatch.setattr(tempfile, "tempdir", None)

    def none_usable():
        raise FileNotFoundError("No usable temporary directory found")

    monkeypatch.setattr(tempfile, "_get_default_tempdir", none_usable)
    with pytest.raises(replay.NoRoom, match="no folder for them in the temporary directory"):
        replay.PassCache([])


def test_many_tracked_layers_keep_their_passes_in_one_file(monkeypatch, tmp_path):
    """Not a file per layer: a model with more tracked layers than the process may open files (macOS
    allows 256 by default; GPT-2 XL tracks 193 linears, a mixture of experts far more)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(60) for m in (nn.Linear(3, 3), nn.Tanh())], nn.Linear(3, 2)).double()
    data, queries = classification_data(12, 3, 2, seed=1), classification_data(4, 3, 2, seed=2)
    specs = tracked_layers(model, None)
    budget = 4 * sum(s.d_out * s.d_a * 8 for s in specs) // 2  # two groups
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(len(os.listdir("/proc/self/fd")) + 30, hard), hard))
    try:
        whole, grouped, said = _blocks_and_groups(model, data, queries, budget, tmp_path, monkeypatch)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not [m for m in said if "disk cannot" in m]
    _close(grouped, whole)


def test_per_module_scores_come_in_the_modules_order(monkeypatch, tmp_path):
    """Also where a later module's queries go in blocks, which turn first."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2), nn.Tanh(), nn.Linear(2, 9), nn.Tanh(), nn.Linear(9, 3)).double()
    data, queries = classification_data(20, 4, 3, seed=1), classification_data(6, 4, 3, seed=2)
    specs = tracked_layers(model, None)
    budget = 1000  # six queries: layer 0 (2 × 5) 480 bytes, layer 2 (9 × 3) 1296, layer 4 (3 × 10) 1440
    turns = layer_groups(specs, 6, lambda s: s.d_out * s.d_a * 8, budget)
    assert [(len(rows), [s.name for s in g]) for rows, g in turns] == [(4, ["2"]), (2, ["2"]), (4, ["4"]),
                                                                     (2, ["4"]), (6, ["0"])]
    whole, grouped, said = _blocks_and_groups(model, data, queries, budget, tmp_path, monkeypatch, per_module=True)
    assert not [m for m in said if "disk cannot" in m]  # the groups, not blocks of queries after NoRoom
    assert list(grouped) == list(whole) == ["0", "2", "4"]
    for name in whole:
        _close(grouped[name], whole[name])


def test_query_rank_in_layer_groups_stays_within_the_budget(monkeypatch, tmp_path):
    """A group's queries are prepared at full rank, then factorised one by one while the others still are:
    both fit the budget together."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 3)).double()
    data, queries = classification_data(30, 20, 3, seed=1), classification_data(16, 20, 3, seed=2)
    task = ClassificationTask()
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, task, traj)
    options = dict(method="ekfac", damping=0.1, query_rank=8)
    whole = sf.score(model, task, traj, factors, data, queries, query_memory_budget=BIG, **options)
    specs = tracked_layers(model, None)
    budget = 16 * sum(8 * (s.d_out + s.d_a) * 8 for s in specs) // 2  # the rank-8 queries: two blocks' worth
    plans, held = [], []

    def full_rank_bytes(plan):
        return sum((v.r if isinstance(v, scoring.EigenQuery) else v).nbytes
                   for qs in plan.queries.values() for q in qs for v in q.values())

    def factorised(layers, rank, lowrank=scoring._lowrank):  # the plan's full-rank queries, and the factors so far
        out = lowrank(layers, rank)
        made = (held[-1][1] if held and held[-1][0] is plans[-1] else 0) + sum(
            f.nbytes for factors in out.values() for f in factors)
        held.append((plans[-1], made, full_rank_bytes(plans[-1]) + made))
        return out

    plan_of = scoring._plan
    monkeypatch.setattr(scoring, "_plan", lambda *a, **k: plans.append(plan_of(*a, **k)) or plans[-1])
    monkeypatch.setattr(scoring, "_lowrank", factorised)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    grouped = sf.score(model, task, traj, factors, data, queries, query_memory_budget=budget, **options)
    _close(grouped, whole)
    assert len(plans) > 1  # layer groups
    assert max(total for _, _, total in held) <= budget


def test_per_token_refuses_modules_with_other_token_counts_before_any_training_pass(monkeypatch, tmp_path):
    """Summed over modules, per-token scores need every module's tokens to be the same positions. In layer
    groups the check sees every layer at the queries' first batch: a group's own check would come after the
    groups before it had read the whole training data."""
    torch.manual_seed(0)
    model = PooledClassifier().double()  # `tokens` sees 5 tokens per example, `head` one
    task = ClassificationTask()
    g = torch.Generator().manual_seed(0)

    def data(n):
        return torch.utils.data.TensorDataset(torch.randn(n, 5, 4, generator=g, dtype=torch.float64),
                                              torch.randint(0, 3, (n,), generator=g))

    train, queries = data(9), data(4)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], train, lr_sum=1.0)])
    factors = sf.fit_factors(model, task, traj, batch_size=4)
    specs = tracked_layers(model, None)
    full = _query_bytes(model, traj, "ekfac", [0], None)
    budget = len(queries) * max(map(full, specs))
    assert [[s.name for s in group] for _, group in layer_groups(specs, len(queries), full, budget)] == [
        ["tokens"], ["head"]]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    message = (r"per_token: module 'head' sees 1 token per example, module 'tokens' 5, so their tokens cannot be "
               r"added up")
    for memory in (BIG, budget):  # one block, then layer groups
        counted = CountingData(train)
        with pytest.raises(ValueError, match=message):
            sf.score(model, task, traj, factors, counted, queries, method="ekfac", batch_size=4, per_token=True,
                     query_memory_budget=memory)
        assert counted.reads < len(train)  # the checks' batch and, in one block, the first training batch
    # Each module's tokens apart: every module's per-token scores sum to its per-module scores.
    per_module = sf.score(model, task, traj, factors, train, queries, method="ekfac", batch_size=4,
                          per_module=True, query_memory_budget=BIG)
    for memory in (BIG, budget):
        tokens = sf.score(model, task, traj, factors, train, queries, method="ekfac", batch_size=4, per_token=True,
                          per_module=True, query_memory_budget=memory)
        assert [tuple(t.shape) for t in tokens.values()] == [(4, 9, 5), (4, 9, 1)]
        for name in per_module:
            _close(tokens[name].sum(-1), per_module[name])
    assert list(tmp_path.iterdir()) == []
