"""``ifd_kmeans``: CodeACT's Complexity and Diversity Aware Sampling (Lv et al. 2024, arXiv 2408.02193; the
authors' ``CDAS/`` of Kyle-Lyu/CodeACT).

* **Diversity**: every example's instruction is embedded (mean-pooled, L2-normalised hidden states of the reference
  model; the authors use a sentence encoder the same way) and the pool is clustered with scikit-learn k-means;
* **Complexity**: the Instruction-Following Difficulty of every example, ``IFD = PPL(answer | instruction) /
  PPL(answer)`` (the authors' ``calculate_ifd``: the answer's perplexity after the prompt
  ``"Question:\\n{question}\\n\\nAnswer:\\n"`` over its perplexity alone).  ``ratio: loss`` takes the ratio of the
  mean losses instead (Li et al.'s definition of IFD, which the CodeACT code does not use);
* examples with ``IFD >= max_ifd`` are dropped (the authors keep ``IFD < 1``: an answer that the instruction does not
  make easier is not learned from the instruction), and the ``cluster_proportional`` selector takes the highest-IFD
  share of every cluster.

The instruction is the conversation's messages before its first assistant message, the answer that message (a pool
of conversations: ``dataset=chat_demo | chat_local | chat_hub``).  Cost: three forward passes per example (the
instruction's embedding, the answer alone, the answer after the instruction), plus k-means.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Sequence

import numpy as np

from effitrain.selection.base import Scores, column_numpy
from effitrain.selection.fingerprints import map_fingerprint
from effitrain.selection.refmodel import ModelScorer, device_of, reference_or_proxy

#: the authors' prompt (CDAS/calculate_ifd.py)
PROMPT = "Question:\n{question}\n\nAnswer:\n"


def instruction_and_answer(messages_json: str) -> tuple[str, str]:
    """The text before the first assistant message (user/system contents) and that message's content."""
    from effitrain.data.chat_records import first_assistant_split

    prompt, rest = first_assistant_split(json.loads(messages_json), "selection.scorer")
    return "\n".join(m["content"] for m in prompt), rest[0]["content"]


def _ids(encode: Callable, texts: Sequence[str]) -> list[list[int]]:
    ids, mask = encode(list(texts))
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def answer_losses(model: Any, encode: Callable, questions: Sequence[str], answers: Sequence[str], device: str,
                  max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Per example, the mean next-token loss of the answer tokens after the prompt, and of the answer alone.

    Prompt and answer are encoded on their own and concatenated (what any encoding starts with -- a BOS -- is kept
    once, at the start), so both losses are over the same answer tokens."""
    prefix = _ids(encode, [""])[0]
    prompts = _ids(encode, [PROMPT.format(question=q) for q in questions])
    alone = _ids(encode, answers)
    seqs, starts = [], []
    for p, a in zip(prompts, alone):
        body = a[len(prefix):] if a[:len(prefix)] == prefix else a
        seqs.append((p + body)[:max_length])
        starts.append(min(len(p), max_length - 1))
    for a in alone:
        seqs.append(a[:max_length])
        starts.append(max(len(prefix), 1))
    losses = _target_losses(model, seqs, starts, device)
    return losses[:len(prompts)], losses[len(prompts):]


def _target_losses(model: Any, seqs: list[list[int]], starts: list[int], device: str) -> np.ndarray:
    """Mean cross-entropy of the tokens ``seq[start:]`` of every sequence (NaN when there is none)."""
    import torch
    import torch.nn.functional as F

    width = max(2, max(len(s) for s in seqs))
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    target = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, :len(s)] = 1
        target[i, start:len(s)] = True
    ids, attn, target = ids.to(device), attn.to(device), target.to(device)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    m = target[:, 1:].float()
    return ((nll * m).sum(1) / m.sum(1)).cpu().numpy()  # 0/0 = NaN: no answer token left


def ifd(loss_given_instruction: np.ndarray, loss_alone: np.ndarray, ratio: str) -> np.ndarray:
    """IFD per example; 0 where it is undefined (the authors' fallback for a failed or NaN score)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if ratio == "perplexity":
            out = np.exp(loss_given_instruction) / np.exp(loss_alone)
        else:
            out = loss_given_instruction / loss_alone
    return np.where(np.isfinite(out), out, 0.0)


class IFDKMeansScorer(ModelScorer):
    def _score(self, candidates, ctx) -> Scores:
        from effitrain.registry import ConfigError
        from effitrain.selection.embeddings import embed
        from effitrain.selection.scorers.lm import kmeans

        p = self.params
        if "messages" not in candidates.column_names:
            raise ConfigError("selection.scorer.name: 'ifd_kmeans' scores instructions and answers; use a chat "
                              "dataset (dataset=chat_demo, chat_local or chat_hub)")
        model, encode, info, tag = reference_or_proxy(p, candidates, ctx, "codeact")
        dev = device_of(p)

        def fn(batch):
            pairs = [instruction_and_answer(m) for m in batch["messages"]]
            questions, answers = [q for q, _ in pairs], [a for _, a in pairs]
            cond, alone = answer_losses(model, encode, questions, answers, dev, p.max_length)
            emb = embed(model, encode, questions, dev, p.layer)
            return {"cond": cond.tolist(), "alone": alone.tolist(), "emb": emb.astype(np.float32).tolist()}

        out = candidates.select_columns(["messages"]).map(
            fn, batched=True, batch_size=p.batch_size, remove_columns=["messages"],
            new_fingerprint=map_fingerprint(candidates, "ifd_kmeans", {"model": tag, "max_length": p.max_length,
                                                                        "layer": p.layer}),
            desc="selection: IFD and embeddings")
        scores = ifd(column_numpy(out, "cond", np.float64), column_numpy(out, "alone", np.float64), p.ratio)
        x = column_numpy(out, "emb", np.float32)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)
        labels, _ = kmeans(x, p.num_clusters, p.kmeans_seed)
        keep = scores < p.max_ifd if p.max_ifd is not None else None
        return Scores(scores=scores, clusters=labels, keep=keep,
                      info={**info, "clusters": int(labels.max() + 1) if len(labels) else 0,
                            "ifd_mean": float(np.mean(scores)) if len(scores) else math.nan,
                            "ifd_below_max": int(keep.sum()) if keep is not None else len(scores)})
