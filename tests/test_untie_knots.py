"""Untie the Knots (effitrain/data/knots.py, effitrain/curriculum/untie_knots.py): the knotted rows keep every
document token exactly once, cut documents into the configured pieces, and their summaries list each document's
piece ids in the original order; the same seed builds the same rows."""

from __future__ import annotations

import numpy as np
import pytest

from effitrain.data.knots import ID_LENGTH, Markers, knotted_rows, split_points

from conftest import EOS, ByteTokenizer


def _docs(n=40, seed=3):
    rng = np.random.default_rng(seed)
    # lengths from 2 to 150 tokens, each document ending with EOS; values tell documents apart
    return [np.append(rng.integers(32, 127, size=int(rng.integers(1, 150))), EOS).astype(np.int32)
            for _ in range(n)]


def _build(docs, seq_len=256, **kw):
    args = dict(markers=Markers.of(ByteTokenizer()), chunks_per_doc=3, knot_probability=1.0,
                preserve_partial_order=False, pad_id=EOS, seed=0) | kw
    return knotted_rows(docs, seq_len, **args)


@pytest.mark.parametrize("knot_probability", [1.0, 0.3])
def test_every_document_token_appears_exactly_once(knot_probability):
    docs = _docs()
    built = _build(docs, knot_probability=knot_probability)
    rows, pieces = built["rows"], built["pieces"]
    # the pieces of every document, by offset, rebuild it exactly: nothing lost, nothing repeated
    for d, doc in enumerate(docs):
        mine = pieces[pieces[:, 3] == d]
        mine = mine[np.argsort(mine[:, 5])]
        got = np.concatenate([rows[r, s:s + n] for r, s, n, *_ in mine])
        np.testing.assert_array_equal(got, doc)
        assert (np.diff(mine[:, 5]) == mine[:-1, 2]).all()  # consecutive, no overlap
    # and the pieces cover exactly the document positions of the rows: everything else is a marker or padding
    covered = np.zeros(rows.shape, int)
    for r, s, n, *_ in pieces:
        covered[r, s:s + n] += 1
    assert covered.max() == 1 and covered.sum() == sum(len(d) for d in docs)
    assert rows.shape[1] == 256 and built["knotted"].any()


def test_pieces_have_the_configured_lengths():
    docs = _docs(120)
    built = _build(docs, seq_len=512, chunks_per_doc=3)
    pieces = built["pieces"]
    knotted_rows_ = np.flatnonzero(built["knotted"])
    checked = 0
    for d, doc in enumerate(docs):
        mine = pieces[(pieces[:, 3] == d) & (pieces[:, 4] >= 0)]  # whole documents, not a row's cut-off tail
        if not len(mine) or mine[0, 0] not in knotted_rows_ or mine[0, 5] != 0:
            continue
        mine = mine[np.argsort(mine[:, 4])]
        L = len(doc)
        expected = [L] if L < 3 else [L // 3, L // 3, L - 2 * (L // 3)]
        assert mine[:, 2].tolist() == expected
        checked += 1
    assert checked > 30
    assert split_points(10, 3) == [0, 3, 6] and split_points(2, 3) == [0]


def _read_headers(row, piece_start, markers):
    close = len(markers.doc_close)
    return bytes(row[piece_start - close - ID_LENGTH:piece_start - close].tolist())


def test_summaries_list_each_documents_piece_ids_in_original_order():
    tok = ByteTokenizer()
    markers = Markers.of(tok)
    built = _build(_docs(), seq_len=512)
    rows, pieces, summaries, mask = built["rows"], built["pieces"], built["summaries"], built["mask"]
    assert len(summaries) > 10
    for r, s, n, d in summaries:
        mine = pieces[(pieces[:, 0] == r) & (pieces[:, 3] == d)]
        mine = mine[np.argsort(mine[:, 4])]  # original order
        ids = [_read_headers(rows[r], start, markers) for start in mine[:, 1]]
        assert bytes(rows[r, s:s + n].tolist()) == b"<S>" + b"<s>".join(ids) + b"</S>"
        # the summary comes right after the document's last piece in the row
        last = mine[np.argmax(mine[:, 1])]
        assert s == last[1] + last[2]
        # targets: the ids and </S>, not <S>; the header before every piece and the piece's first token are not
        assert not mask[r, s:s + 3].any() and mask[r, s + 3:s + n].all()
        for start in mine[:, 1]:
            assert not mask[r, start - 3 - ID_LENGTH - 4:start + 1].any() and mask[r, start + 1]
    # pieces of a document really are shuffled in some rows (the order is the task)
    out_of_order = 0
    for r, _, _, d in summaries:
        mine = pieces[(pieces[:, 0] == r) & (pieces[:, 3] == d)]
        out_of_order += bool((np.diff(mine[np.argsort(mine[:, 4]), 1]) < 0).any())
    assert out_of_order > 0


def test_preserve_partial_order_keeps_each_documents_pieces_in_order():
    built = _build(_docs(), seq_len=512, preserve_partial_order=True)
    pieces = built["pieces"]
    for r, _, _, d in built["summaries"]:
        mine = pieces[(pieces[:, 0] == r) & (pieces[:, 3] == d)]
        assert (np.diff(mine[np.argsort(mine[:, 4]), 1]) > 0).all()


def test_same_seed_same_rows_other_seed_other_rows():
    docs = _docs()
    a, b, c = _build(docs, seed=5), _build(docs, seed=5), _build(docs, seed=6)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["rows"], c["rows"])


def test_the_hook_writes_labels_from_the_mask():
    import torch

    from effitrain.curriculum.untie_knots import UntieKnotsSampler
    from effitrain.engine.state import State  # noqa: F401 -- the hook only needs .batch

    built = _build(_docs(), seq_len=256)
    built["domain"] = np.array(["x"] * len(built["rows"]))
    sampler = UntieKnotsSampler(built, seed=0, micro_batch_size=2, grad_accum=1, world_size=1, rank=0)
    batch = next(iter(sampler))

    class S:
        pass
    state = S()
    state.batch = {"input_ids": torch.from_numpy(np.asarray(sampler.train_rows[batch], np.int64))}
    sampler.hook.on_batch_start(state)
    labels = state.batch["labels"].numpy()
    m = built["mask"][batch]
    assert (labels[~m] == -100).all() and (labels[m] == built["rows"][batch][m]).all()


def test_sequence_parallel_needs_seq_len_divisible_at_check():
    from effitrain.config.compose import compose_config
    from effitrain.config.rules import check_rules
    from effitrain.config.spec import validate
    from effitrain.registry import ConfigError

    def check(*overrides):
        composed = compose_config(["+recipe=untie_knots", *overrides])
        check_rules(validate(composed.cfg, composed.recipes))

    # a knotted row is one sequence of dataset.seq_len tokens: Ulysses splits it, so it must divide by sp
    with pytest.raises(ConfigError, match=r"sequence_parallel_size=4: dataset.seq_len=510 is not divisible"):
        check("parallelism.sequence_parallel_size=4", "dataset.seq_len=510")
    check("parallelism.sequence_parallel_size=4")
