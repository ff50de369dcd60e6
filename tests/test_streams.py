"""Training data as a stream (an IterableDataset: no len(), no indexing) or a DataLoader gives the
same factors and scores as the dataset itself, reads the stream as often as promised, and bad
forms of data are refused with errors that say what to do."""

import functools
import hashlib
import warnings

import numpy as np
import pytest
import torch
from _helpers import ClassifyTask, classification_data, mlp, perturbed_states
from torch.utils.data import DataLoader, DistributedSampler

import source_fast as sf
from source_fast import scoring
import source_fast.corpus as corpus
from source_fast.corpus import load_scores, load_top_k, score_corpus

N = 50  # not a multiple of any chunk or batch size below


class CountingStream(torch.utils.data.IterableDataset):
    """A dataset's examples as a stream that counts how often it is read from the start."""

    def __init__(self, data):
        self.data, self.reads = data, 0

    def __iter__(self):
        self.reads += 1
        return (self.data[i] for i in range(len(self.data)))


@pytest.fixture
def setup():
    model = mlp(5, 6, 3)
    data = classification_data(N, 5, 3, seed=1)
    queries = classification_data(4, 5, 3, seed=2)
    states = perturbed_states(model, 4, scale=0.1)
    return model, ClassifyTask(), data, queries, states


def _trajectory(states, data, **kwargs):
    return sf.Trajectory.even(states, [0.05] * 40, 2, data, momentum=0.9, **kwargs)


def _assert_same_factors(a, b):
    for sa, sb in zip(a.segments, b.segments):
        for name in sa:
            for field in ("a_cov", "s_cov", "lam"):
                x, y = getattr(sa[name], field), getattr(sb[name], field)
                assert torch.allclose(x, y, rtol=1e-10, atol=1e-14), (name, field)
    assert a.num_examples == b.num_examples


# float64 throughout; the forms batch the examples differently (stream chunks, DataLoader batches),
# so sums run in other orders: agreement to 1e-10 relative, not bit for bit.
@pytest.mark.parametrize("form", ["stream", "loader_of_dataset", "loader_of_stream"])
def test_every_form_of_training_data_gives_the_dataset_scores(setup, form, monkeypatch):
    model, task, data, queries, states = setup
    monkeypatch.setattr(scoring, "STREAM_CHUNK", 16)  # 4 pieces of the 50 examples
    stream = CountingStream(data)
    other = {"stream": stream, "loader_of_dataset": DataLoader(data, batch_size=7),
             "loader_of_stream": DataLoader(stream, batch_size=6)}[form]
    ref_traj, traj = _trajectory(states, data), _trajectory(states, other, num_examples=N)
    ref_f = sf.fit_factors(model, task, ref_traj, fisher="empirical", batch_size=8)
    factors = sf.fit_factors(model, task, traj, fisher="empirical", batch_size=8)
    if form != "loader_of_dataset":  # covariance and Λ passes at each of the 4 checkpoints, and the
        assert stream.reads == 2 * 4 + 1  # check that the loss sums over the batch (its first examples)
    _assert_same_factors(factors, ref_f)
    # Queries are read once, into memory: a one-shot iterator will do.
    assert torch.equal(sf.score(model, task, ref_traj, ref_f, data, iter([queries[i] for i in range(4)])),
                       sf.score(model, task, ref_traj, ref_f, data, queries))
    query_stream = CountingStream(queries)
    for method, t, rt, f, rf in [("source", traj, ref_traj, factors, ref_f), ("tracin", traj, ref_traj, None, None)]:
        reads = stream.reads
        got = sf.score(model, task, t, f, other, query_stream, method=method, batch_size=8)
        want = sf.score(model, task, rt, rf, data, queries, method=method, batch_size=8)
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-14), (method, (got - want).abs().max())
        if form != "loader_of_dataset":  # all 4 checkpoints score each buffered piece: one read (and the
            assert stream.reads == reads + 1 + 1  # check that the loss sums over the batch)
    final, ref_final = traj.final(), ref_traj.final()
    f_final = sf.fit_factors(model, task, final, fisher="empirical", batch_size=8)
    ref_f_final = sf.fit_factors(model, task, ref_final, fisher="empirical", batch_size=8)
    got = sf.score(model, task, final, f_final, other, queries, method="ekfac", damping=1e-3)
    want = sf.score(model, task, ref_final, ref_f_final, data, queries, method="ekfac", damping=1e-3)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)
    # Self-influence: the fused one-basis path (ekfac) and the chunked walk (SOURCE over 2 segments).
    got = sf.self_score(model, task, final, f_final, other, method="ekfac", damping=1e-3)
    want = sf.self_score(model, task, ref_final, ref_f_final, data, method="ekfac", damping=1e-3)
    assert got.shape == (N,) and torch.allclose(got, want, rtol=1e-10, atol=1e-14)
    got = sf.self_score(model, task, traj, factors, other, chunk_size=16)
    want = sf.self_score(model, task, ref_traj, ref_f, data, chunk_size=16)
    assert got.shape == (N,) and torch.allclose(got, want, rtol=1e-10, atol=1e-14)


class EditingTask(ClassifyTask):
    """A task that doubles its batch's inputs in place: the data it was handed must stay as it was."""

    def compute_train_loss(self, batch, model, sample=False):
        batch[0].mul_(2.0)
        return super().compute_train_loss(batch, model, sample)


def test_tensor_datasets_read_by_the_batch_give_default_collates_batches(setup):
    """A TensorDataset (or a Subset of one) is read a batch at a time: the same batches, bit for bit,
    as a DataLoader's per-example reads and default_collate, the same sampled true-Fisher labels
    (the DataLoader's one random draw per pass is kept), and new tensors, so a task editing its batch
    in place leaves the dataset alone."""
    from source_fast._passes import make_loader

    model, task, data, queries, states = setup
    part = torch.utils.data.Subset(torch.utils.data.Subset(data, list(range(3, N))), [5, 0, 9, 2, 30, 31, 17])

    class Doubled(torch.utils.data.Subset):  # a Subset that reads its examples its own way: left to it
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return 2 * x, y

        def __getitems__(self, indices):  # torch asks a Subset overriding __getitem__ for both
            return [self[i] for i in indices]

    for given in (data, part, Doubled(data, [4, 1, 7])):
        fast, plain = make_loader(given, 4, None), DataLoader(given, batch_size=4)
        for x, y in zip(fast, plain):
            assert type(x) is type(y) and all(torch.equal(u, v) and u.dtype == v.dtype for u, v in zip(x, y))
    traj, plain_traj = _trajectory(states, data), _trajectory(states, DataLoader(data, batch_size=8))
    factors = sf.fit_factors(model, task, traj, fisher="true", batch_size=8)
    plain_factors = sf.fit_factors(model, task, plain_traj, fisher="true")
    for a, b in zip(factors.segments, plain_factors.segments):
        for name in a:
            assert torch.equal(a[name].lam, b[name].lam) and torch.equal(a[name].s_cov, b[name].s_cov), name
    before = data.tensors[0].clone()
    sf.fit_factors(model, EditingTask(), traj, fisher="empirical", batch_size=8)
    assert torch.equal(data.tensors[0], before)


def _digest(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").glob("*"))}


def test_fingerprints_see_text_and_arrays():
    """Corpus and fit fingerprints must tell apart data that is text (tokenized by a collate_fn) or numpy."""
    from source_fast._passes import digest_examples

    texts = [digest_examples([{"text": t, "label": 1}] * 3) for t in ("a cat", "a dog")]
    arrays = [digest_examples([(np.full(4, v), np.int64(2))]) for v in (0.0, 1.0)]
    words = [digest_examples([np.array(["a", w])]) for w in ("cat", "dog")]  # numpy text, not numbers
    tokens = [digest_examples([{"input_ids": [5, 9, v, 2]}]) for v in (3, 4)]  # token lists, hashed as arrays
    mixed = [digest_examples([[1, w]]) for w in ("cat", "dog")]  # a list that is not all numbers
    assert texts[0] != texts[1] and arrays[0] != arrays[1] and words[0] != words[1]
    assert tokens[0] != tokens[1] and mixed[0] != mixed[1]


def test_fingerprints_of_images_and_objects_are_their_content_not_their_address():
    """A PIL image's repr, and any object's default one, holds its memory address, which differs
    between processes: ranks comparing their data, or a resumed run checking its shards. Images
    count by pixels, mode, size and palette; objects with a default repr by class and attributes."""
    from PIL import Image

    from source_fast._passes import digest_examples

    def image(v, shape=(4, 3)):
        return Image.fromarray(np.full(shape, v, dtype=np.uint8))

    class Record:  # a default repr: <...Record object at 0x...>
        def __init__(self, value):
            self.value = value

    def digest(x):
        return digest_examples([(x, 1)])

    assert digest(image(7)) == digest(image(7))  # two objects, the same pixels
    assert digest(image(7)) != digest(image(8))
    assert digest(image(7)) != digest(image(7, (3, 4)))  # the same 12 bytes, another size
    red, blue = image(0).convert("P"), image(0).convert("P")
    red.putpalette([255, 0, 0] * 256)
    blue.putpalette([0, 0, 255] * 256)
    assert digest(red) != digest(blue)  # the same indices, other colours
    assert digest(Record(1)) == digest(Record(1))
    assert digest(Record(1)) != digest(Record(2))
    assert digest(Record(np.arange(3))) != digest(Record(np.arange(1, 4)))
    assert digest(functools.partial(max, 1)) != digest(functools.partial(max, 2))  # its repr, less the address
    assert digest(Record(Record(torch.arange(3)))) != digest(Record(Record(torch.arange(1, 4))))  # one object down
    assert digest("x <y at 0x1>") == digest("x <y at 0x1>") != digest("x <y at 0x2>")  # text is text
    # An attribute leading back to the dataset (or round to the example) is not read for every example:
    # below the example's own attributes, an object counts by its own plain values.
    table = Record(None)
    table.value = [Record(i) for i in range(3)]
    for row in table.value:
        row.table = table
    assert digest(table.value[0]) == digest(table.value[0]) != digest(table.value[1])


def test_fingerprints_of_an_index_beside_features():
    """(3, features): a list that starts with a number but is not a list of numbers (numpy refused
    the ragged array, and the fingerprint raised)."""
    from source_fast._passes import digest_examples

    for features in (torch.ones(2), [1.0, 2.0], np.ones(2)):
        assert digest_examples([(3, features)]) != digest_examples([(4, features)])
    assert digest_examples([(3, torch.ones(2))]) != digest_examples([(3, torch.zeros(2))])


def test_fingerprints_of_plain_data_are_the_same_as_ever():
    """score_corpus's manifests and shards and fit_factors' resume_dir hold these digests: a change would
    make every existing output folder refuse to resume. Fixed values, as written since 2026-11-28."""
    from source_fast._passes import digest_examples

    assert digest_examples([(torch.arange(5.0), 1)]) == "1:db21693d6446eee8"
    assert digest_examples([{"input_ids": [5, 9, 2], "label": 1, "weight": 0.5}]) == "1:1a53b5dab8455394"
    assert digest_examples([{"a": 1, "b": 2}, {"a": 1.5, "b": 2.5}]) == "2:0c730b69905c5ef7"
    assert digest_examples([{"text": "a cat", "label": 1}]) == "1:aea7eef6eb633e78"
    assert digest_examples([(np.arange(3), np.int64(2), np.array(["a", "b"]))]) == "1:d743eece2a3c0bcd"


def test_an_output_folder_of_another_format_is_refused(setup, tmp_path):
    model, task, data, queries, states = setup
    traj = _trajectory(states, data)
    factors = sf.fit_factors(model, task, traj, fisher="empirical", batch_size=8)
    score_corpus(model, task, traj, factors, data, queries, tmp_path, progress=False)
    manifest = tmp_path / "manifest.json"
    from source_fast.corpus import MANIFEST_VERSION

    old = MANIFEST_VERSION - 1
    manifest.write_text(manifest.read_text().replace(f'"version": {MANIFEST_VERSION}', f'"version": {old}'))
    with pytest.raises(ValueError, match=rf"another version of score_corpus \(format {old}\); delete it"):
        score_corpus(model, task, traj, factors, data, queries, tmp_path, progress=False)


def test_corpus_from_a_stream_shards_resumes_and_keeps_top_k(setup, tmp_path):
    model, task, data, queries, states = setup
    stream = CountingStream(data)
    traj = _trajectory(states, stream, num_examples=N)
    factors = sf.fit_factors(model, task, traj, fisher="empirical", batch_size=8)
    full = sf.score(model, task, _trajectory(states, data), factors, data, queries)
    budget = 2 * 2 * 8 * (6 * 6 + 3 * 7)  # two queries' prepared gradients (2 segments, float64): 2 blocks
    reads = stream.reads
    out = tmp_path / "scores"
    score_corpus(model, task, traj, factors, stream, queries, out, shard_size=16, query_memory_budget=budget,
                 progress=False)
    # Once (each shard scored against both blocks' queries on this CPU), plus the manifest's fingerprint and
    # the check that the loss sums over the batch.
    assert stream.reads == reads + 1 + 1 + 1
    assert sorted(p.name for p in (out / "shards").glob("q1_*.json")) == [
        "q1_0-16.json", "q1_16-32.json", "q1_32-48.json", "q1_48-50.json"]
    assert torch.allclose(load_scores(out), full, rtol=1e-10, atol=1e-14)
    before = _digest(out)
    # A job killed after some shards: remove one shard, corrupt another, drop the completion mark.
    (out / "shards" / "q0_16-32.json").unlink()
    shard = out / "shards" / "q1_48-50.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    (out / "rows.json").unlink()
    with pytest.raises(ValueError, match="has not finished"):
        load_scores(out)
    score_corpus(model, task, traj, factors, stream, queries, out, shard_size=16, query_memory_budget=budget,
                 progress=False)
    assert _digest(out) == before
    # A stream whose examples 16-31 changed since: only that shard is scored again (in both blocks).
    changed = CountingStream(torch.utils.data.TensorDataset(data.tensors[0].clone(), data.tensors[1]))
    changed.data.tensors[0][20] += 1.0
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.json")}
    traj_changed = _trajectory(states, changed, num_examples=N)
    score_corpus(model, task, traj_changed, factors, changed, queries, out, shard_size=16, query_memory_budget=budget,
                 progress=False)
    redone = sorted(name for name, t in mtimes.items() if (out / "shards" / name).stat().st_mtime_ns != t)
    assert redone == ["q0_16-32.json", "q1_16-32.json"]
    new_full = sf.score(model, task, _trajectory(states, changed.data), factors, changed.data, queries)
    assert torch.allclose(load_scores(out), new_full, rtol=1e-10, atol=1e-14)
    top = tmp_path / "top"
    score_corpus(model, task, traj, factors, stream, queries, top, shard_size=16, top_k=5, progress=False)
    got = load_top_k(top)
    want = full.topk(5, dim=1)
    assert torch.allclose(got["top_values"], want.values, rtol=1e-10, atol=1e-14)
    assert torch.equal(got["top_indices"], want.indices)


class Shrinking(CountingStream):
    """Yields one example fewer on every pass: not the same data twice."""

    def __iter__(self):
        self.reads += 1
        return (self.data[i] for i in range(len(self.data) - self.reads))


def test_bad_data_is_refused_with_the_fix(setup, tmp_path, monkeypatch):
    model, task, data, queries, states = setup
    traj = _trajectory(states, data)
    factors = sf.fit_factors(model, task, traj, fisher="empirical", batch_size=8)
    with pytest.raises(TypeError, match="one-shot iterator"):
        sf.score(model, task, traj, factors, iter(list(data)), queries, train_segments="all")
    with pytest.raises(TypeError, match="an iterable of examples or a DataLoader; got int"):
        sf.score(model, task, traj, factors, 3, queries, train_segments="all")
    with pytest.raises(ValueError, match="shuffles or samples"):
        sf.score(model, task, traj, factors, DataLoader(data, batch_size=4, shuffle=True), queries, train_segments="all")
    with pytest.raises(ValueError, match="drop_last"):
        sf.score(model, task, traj, factors, DataLoader(data, batch_size=4, drop_last=True), queries, train_segments="all")
    ddp = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, num_replicas=2, rank=0, shuffle=False))
    with pytest.raises(ValueError, match="has a DistributedSampler: give every rank a DataLoader over the whole"):
        sf.score(model, task, traj, factors, ddp, queries, train_segments="all")
    loader = DataLoader(data, batch_size=4)
    with pytest.raises(ValueError, match="a collate_fn of its own, and collate_fn= gives another: pass the loader's"):
        sf.score(model, task, traj, factors, loader, queries, train_segments="all",
                 collate_fn=lambda b: torch.utils.data.default_collate(b))
    # The loader's own collate_fn also batches the queries given as a list.
    torch.testing.assert_close(
        sf.score(model, task, traj, factors, loader, list(queries), train_segments="all", collate_fn=loader.collate_fn),
        sf.score(model, task, traj, factors, data, queries, train_segments="all"))
    with pytest.raises(TypeError, match=r"data is a dict with keys \['x', 'y'\], which looks like one batch: pass the"):
        sf.score(model, task, traj, factors, data, {"x": queries.tensors[0], "y": queries.tensors[1]}, train_segments="all")
    # A dict keyed by the example indices is a dataset (DataLoader reads it so), not a batch.
    as_dict = {i: queries[i] for i in range(len(queries))}
    torch.testing.assert_close(sf.score(model, task, traj, factors, data, as_dict, train_segments="all"),
                               sf.score(model, task, traj, factors, data, queries, train_segments="all"))
    # The loader's collate_fn given again is that function even when it is a bound method (== not is).
    class Collator:
        def collate(self, batch):
            return torch.utils.data.default_collate(batch)
    col = Collator()
    bound = DataLoader(data, batch_size=4, collate_fn=col.collate)
    sf.score(model, task, traj, factors, bound, list(queries), train_segments="all", collate_fn=col.collate)
    with pytest.raises(ValueError, match="give num_examples="):
        _trajectory(states, CountingStream(data))
    with pytest.raises(ValueError, match="num_examples=49 but its data has 50"):
        _trajectory(states, data, num_examples=49)
    with pytest.raises(ValueError, match=r"segment 0, checkpoint 0: the data yielded 50 examples but the segment has num_examples=51"):
        sf.fit_factors(model, task, _trajectory(states, CountingStream(data), num_examples=51), fisher="empirical")
    final = _trajectory(states, CountingStream(data), num_examples=N).final()
    with pytest.raises(TypeError, match="method 'trak' needs a dataset with len"):
        sf.score(model, task, final, None, final.segments[0].data, queries, method="trak")
    with pytest.raises(ValueError, match="IterableDataset with num_workers > 0"):
        sf.score(model, task, traj, factors, DataLoader(CountingStream(data), batch_size=4, num_workers=2), queries,
                 train_segments="all")
    with pytest.raises(ValueError, match="in_order=False"):
        sf.score(model, task, traj, factors, DataLoader(data, batch_size=4, num_workers=1, in_order=False), queries,
                 train_segments="all")
    sampled = DataLoader(data, batch_size=4, sampler=torch.utils.data.SubsetRandomSampler(range(10)))
    with pytest.raises(ValueError, match="shuffles or samples"):  # score_corpus slices the loader's dataset itself
        score_corpus(model, task, traj, factors, sampled, queries, tmp_path / "sampled", train_segments="all")
    stream_traj = _trajectory(states, CountingStream(data), num_examples=51)
    with pytest.raises(ValueError, match="yielded 50 examples but segment 0 has num_examples=51"):
        sf.score(model, task, stream_traj, None, stream_traj.segments[0].data, queries, method="tracin")
    shrinking = Shrinking(data)
    monkeypatch.setattr(corpus, "_one_read_pays", lambda *args: False)  # block by block: a read per block
    with pytest.raises(ValueError, match=r"yielded \[46, 47\] examples"):  # after the fingerprint's and the sum check's
        score_corpus(model, task, traj, factors, shrinking, queries, tmp_path, shard_size=16, train_segments="all",
                     query_memory_budget=2 * 2 * 8 * (6 * 6 + 3 * 7), progress=False)


def test_a_rerun_scored_with_other_checkpoints_or_num_examples_is_refused(setup, tmp_path):
    """Finished shards are reused only for the same weights and the same N (the 1/N in every score)."""
    model, task, data, queries, states = setup
    stream = CountingStream(data)
    with pytest.raises(ValueError, match="yielded 50 examples but segment 0 has num_examples=51"):
        score_corpus(model, task, _trajectory(states, stream, num_examples=N + 1), None, stream, queries, tmp_path / "n",
                     "tracin", shard_size=16, progress=False)
    with pytest.raises(ValueError, match=r"differs in: trajectory"):  # its shards were scored with 1/51, not 1/50
        score_corpus(model, task, _trajectory(states, stream, num_examples=N), None, stream, queries, tmp_path / "n",
                     "tracin", shard_size=16, progress=False)
    score_corpus(model, task, _trajectory(states, data), None, data, queries, tmp_path / "c", "tracin", progress=False)
    moved = [{k: v + 0.01 for k, v in s.items()} for s in states]  # training went on: the same shapes, other weights
    with pytest.raises(ValueError, match=r"differs in: checkpoints"):
        score_corpus(model, task, _trajectory(moved, data), None, data, queries, tmp_path / "c", "tracin", progress=False)


def test_a_refused_setting_leaves_nothing_to_refuse_its_fix(setup, tmp_path):
    """Settings are checked before the manifest is written: the rerun the error suggests is accepted."""
    model, task, data, queries, states = setup
    traj = _trajectory(states, data)
    with pytest.raises(ValueError, match=r"more than query_memory_budget=1500: .* \(query_rank=2 fits\)"):
        score_corpus(model, task, traj, None, data, queries, tmp_path, "tracin", query_memory_budget=1500, progress=False)
    with pytest.raises(ValueError, match="query_rank must be a positive integer or None, got -1"):
        score_corpus(model, task, traj, None, data, queries, tmp_path, "tracin", query_rank=-1, progress=False)
    score_corpus(model, task, traj, None, data, queries, tmp_path, "tracin", query_memory_budget=1500, query_rank=2,
                 progress=False)
    # train_segments as a tuple: the manifest stores JSON, and a resume must still recognise its own run.
    for _ in range(2):
        score_corpus(model, task, traj, None, data, queries, tmp_path / "t", "tracin", train_segments=(0, 1), progress=False)


class Reordering(CountingStream):
    """The same examples on every pass, but every other pass in reverse: not the same sequence."""

    def __iter__(self):
        self.reads += 1
        order = range(len(self.data)) if self.reads % 2 else reversed(range(len(self.data)))
        return (self.data[i] for i in order)


def test_a_stream_that_reorders_between_passes_is_said_once(setup):
    """fit_factors reads the stream once per pass (2 per checkpoint): a pass that begins with another
    example than the first pass did is said, once; a stream that repeats itself says nothing."""
    model, task, data, queries, states = setup
    for stream, said in ((Reordering(data), 1), (CountingStream(data), 0)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sf.fit_factors(model, task, _trajectory(states, stream, num_examples=N), fisher="empirical")
        named = [str(w.message) for w in caught if "began this pass with another example" in str(w.message)]
        assert len(named) == said, named
        assert all(m.startswith(f"the stream {type(stream).__name__} began") and "reshuffles" in m for m in named)


def test_a_stream_reordered_between_query_blocks_is_refused(setup, tmp_path, monkeypatch):
    """Block by block (a GPU, ranks), each query block reads the stream again: its scores' columns must be
    the same examples as the others'."""
    model, task, data, queries, states = setup
    monkeypatch.setattr(corpus, "_one_read_pays", lambda *args: False)
    stream = Reordering(data)
    traj = _trajectory(states, stream, num_examples=N)
    with pytest.raises(ValueError, match=r"other examples at rows 0-16 on different passes"):
        score_corpus(model, task, traj, None, stream, queries, tmp_path, "tracin", shard_size=16,
                     query_memory_budget=2 * 4 * 8 * (6 * 6 + 3 * 7), progress=False)  # 2 blocks of 2 queries
    assert not (tmp_path / "rows.json").exists()
