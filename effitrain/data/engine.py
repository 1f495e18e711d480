"""The data engine: a corpus of files processed as datatrove pipelines, split into tasks over the files.

A stage is a list of small datatrove steps -- a reader that yields the task's documents, then steps that act on
them -- run by one of datatrove's executors (local processes, a SLURM job array, Ray).  Steps know nothing of the
executor: a task ``rank`` of ``tasks`` reads the files ``rank, rank + tasks, ...`` of the sorted file list and
writes one output per file, so the outputs do not depend on how many tasks there were.  datatrove marks each finished
task (``<stage>/logs/completions/NNNNN``); running the same stage again skips the marked tasks, so a relaunch after a
crash or a SIGKILL redoes only the missing ones.

The steps of this slice (issue 24):

* :class:`CorpusReader` -- the task's documents, as the in-memory ``local`` builder sees them
  (:mod:`effitrain.data.records`), each tagged with its file and record number;
* :class:`DocumentIndex` -- per file, every document's domain and hash ranks (for the eval hold-out and the
  tokenizer's training sample), and the task's best sample candidates with their texts;
* :class:`TokenStreams` -- per file, every document tokenized (+ EOS) and appended to one token stream per split
  and domain.

Selection scorers and filters (a later slice) are further steps between the reader and the writer.
Outputs are written to a temporary name and renamed, so a killed task never leaves a file that looks finished.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

try:  # datatrove is the optional `data` extra; without it this module still imports (the steps need it to run)
    from datatrove.data import Document
    from datatrove.executor.slurm import SlurmPipelineExecutor
    from datatrove.pipeline.base import PipelineStep
except ImportError:  # pragma: no cover - exercised only without the extra
    Document = None
    PipelineStep = SlurmPipelineExecutor = object

from effitrain.errors import RunFailed
from effitrain.registry import ConfigError

INSTALL = "pip install 'effitrain[data]' (datatrove)"


def id_rank(doc_id: str) -> int:
    """The eval hold-out rank of a document id (:func:`effitrain.data.sources.hold_out` sorts by its bytes; as a
    big-endian integer the order is the same)."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "big")


def task_files(n_files: int, rank: int, world_size: int) -> range:
    """The files a task reads: every ``world_size``-th from ``rank`` (datatrove's own sharding of a file list)."""
    return range(rank, n_files, world_size)


def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, final: Path) -> None:
    shutil.rmtree(final, ignore_errors=True)  # a rerun of a task killed after its rename
    os.rename(tmp, final)


class CorpusReader(PipelineStep):
    """Yields the task's documents; ``metadata``: ``file`` (index in ``files``), ``record`` (position among the
    file's records), ``domain`` and ``source_id`` (the record's own id or None).  Writes each file's record count
    to ``records_dir`` (the positional ids of the in-memory builder count records across files)."""

    name = "effitrain corpus"
    type = "📖 - READER"

    def __init__(self, files: Sequence[str], fmt: str, *, text_field: str, domain_field: Optional[str],
                 domains: Optional[Sequence[str]], records_dir: Optional[str] = None) -> None:
        super().__init__()
        self.files, self.fmt, self.text_field, self.domain_field = list(files), fmt, text_field, domain_field
        self.domains = None if domains is None else set(domains)
        self.records_dir = records_dir

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
        from effitrain.data.records import RecordFile

        for file_index in task_files(len(self.files), rank, world_size):
            records = RecordFile(self.files[file_index], self.fmt, text_field=self.text_field,
                                 domain_field=self.domain_field)
            for record in records:
                if self.domains is not None and record.domain not in self.domains:
                    continue
                self.stat_update("documents")
                yield Document(text=record.text, id=f"{file_index}/{record.index}",
                               metadata={"file": file_index, "record": record.index, "domain": record.domain,
                                         "source_id": record.doc_id})
            if self.records_dir is not None:
                _write_json(Path(self.records_dir) / f"{file_index:06d}.json", {"records": records.records})


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _per_file(data: Any) -> Iterator[tuple[int, Iterator[Any]]]:
    """Group a task's documents by file (a reader yields the files one after the other), lazily: each file's
    documents are an iterator to consume before asking for the next file, so a step holds one document at a time,
    not a file's (a file of a web-scale corpus is gigabytes)."""
    return itertools.groupby(data or (), key=lambda doc: doc.metadata["file"])


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Lists of ``size`` items (the last one shorter) from an iterator (``itertools.batched`` is Python 3.12)."""
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def domain_codes(domains: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(sorted domain names, each document's code into them)`` of one file's documents, in one pass."""
    names, codes = np.unique(np.asarray(domains, dtype=str), return_inverse=True)
    return names, codes.astype(np.int32)


def offer_candidate(heap: list, rank: int, file_index: int, record: int, text: str, cap: int) -> None:
    """Keep in ``heap`` the ``cap`` documents of lowest ``(rank, file, record)`` offered so far (a max-heap of
    negated keys: the worst kept candidate on top)."""
    item = (-rank, -file_index, -record, text)
    if len(heap) < cap:
        heapq.heappush(heap, item)
    elif item > heap[0]:
        heapq.heapreplace(heap, item)


def write_candidates(path: Path, heap: list) -> None:
    """``heap``'s candidates as JSON lines sorted by ``(rank, file, record)`` (what :func:`lowest_candidates`
    merges), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        for neg_rank, neg_file, neg_record, text in sorted(heap, reverse=True):
            fh.write(json.dumps({"rank": -neg_rank, "file": -neg_file, "record": -neg_record, "text": text}) + "\n")
    os.replace(tmp, path)


def lowest_candidates(folder: Path, k: int, skip: Any = frozenset()) -> list[tuple[int, int, str]]:
    """The ``k`` candidates of lowest ``(rank, file, record)`` among the sorted files of ``folder`` -- a streaming
    merge that holds only the chosen -- without the ``(file, record)`` pairs in ``skip``; as ``(file, record,
    text)`` in corpus order."""
    def read(part: Path) -> Iterator[tuple[int, int, int, str]]:
        with open(part, encoding="utf-8") as fh:
            for line in fh:
                c = json.loads(line)
                yield c["rank"], c["file"], c["record"], c["text"]

    chosen = []
    for _, file_index, record, text in heapq.merge(*(read(p) for p in sorted(folder.glob("*.jsonl")))):
        if len(chosen) == k:
            break
        if (file_index, record) not in skip:
            chosen.append((file_index, record, text))
    return sorted(chosen)


class DocumentIndex(PipelineStep):
    """Per file ``index/NNNNNN.npz``: ``record``, ``domain`` (codes into ``domains``), ``has_id`` and ``id_rank``
    (the hold-out rank of the record's own id; positional ids are ranked in the reduce, which knows the record
    offsets) and ``sample_rank``.  With ``sample_docs``, also the task's best sample candidates with their texts
    (``sample/NNNNN.jsonl``): the ``sample_docs + holdout * domains`` lowest sample ranks, enough that the global
    sample of train documents (the eval documents removed later) is among the union of the tasks' candidates."""

    name = "effitrain index"
    type = "🔢 - INDEX"

    def __init__(self, out_dir: str, *, sample_docs: int, holdout: int) -> None:
        super().__init__()
        self.out_dir, self.sample_docs, self.holdout = out_dir, sample_docs, holdout

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
        from effitrain.data.tokenizer import sample_rank

        out = Path(self.out_dir)
        heap: list[tuple[int, int, int, str]] = []  # (-rank, -file, -record, text): the worst candidate on top
        domains_seen: set[str] = set()
        for file_index, docs in _per_file(data):
            records, domains, ids, ranks = [], [], [], []
            for doc in docs:
                records.append(doc.metadata["record"])
                domains.append(doc.metadata["domain"])
                ids.append(doc.metadata["source_id"])
                ranks.append(sample_rank(doc.text))
                if self.sample_docs:
                    domains_seen.add(doc.metadata["domain"])
                    # the cap only grows (domains are added): a candidate pushed out had `cap` better ones among the
                    # documents seen so far, all of the domains seen so far, of which at most `holdout` a domain are
                    # held out -- so `sample_docs` better train documents remain and it cannot be in the sample
                    offer_candidate(heap, ranks[-1], file_index, records[-1], doc.text,
                                    self.sample_docs + self.holdout * len(domains_seen))
            names, codes = domain_codes(domains)
            domains_seen.update(names.tolist())
            arrays = {
                "record": np.array(records, dtype=np.int64),
                "domain": codes,
                "has_id": np.array([i is not None for i in ids], dtype=bool),
                "id_rank": np.array([id_rank(i) if i is not None else 0 for i in ids], dtype=np.uint64),
                "sample_rank": np.array(ranks, dtype=np.uint64),
                "domains": names,
            }
            tmp = out / "index" / f".{file_index:06d}.tmp{os.getpid()}.npz"
            tmp.parent.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, **arrays)
            os.replace(tmp, out / "index" / f"{file_index:06d}.npz")
            self.stat_update("files")
        if self.sample_docs:
            write_candidates(out / "sample" / f"{rank:05d}.jsonl", heap)
        return iter(())


def document_keys(path: str) -> np.ndarray:
    """The ``(file, record)`` pairs of an ``.npy`` as sorted int64 keys ``file << 32 | record``."""
    pairs = np.load(path).astype(np.int64).reshape(-1, 2)
    return np.sort((pairs[:, 0] << 32) | pairs[:, 1])


def records_of(keys: np.ndarray, file_index: int) -> set[int]:
    """The records of one file among sorted :func:`document_keys` (a set the size of that file's share only)."""
    lo, hi = np.searchsorted(keys, [file_index << 32, (file_index + 1) << 32])
    return set((keys[lo:hi] & 0xFFFFFFFF).tolist())


#: the dtype of each side file of a token stream (``bin``, the tokens, takes the vocabulary's)
_SIDE_DTYPES = {"len": np.uint32, "rec": np.uint32, "msk": np.uint8}


class TokenStreams(PipelineStep):
    """Per file ``tokens/NNNNNN/``: ``{train,eval}-<k>.bin`` token streams (documents in file order, EOS after
    each) for the file's domain number ``k``, and ``meta.json`` with the domain names and token counts.  A document
    is in ``eval`` when its ``(file, record)`` is in ``eval_docs`` (an ``.npy`` of pairs).  With ``lengths``, also
    ``train-<k>.len``: each train document's token count with its EOS (``uint32``), and ``train-<k>.rec``: its
    record number (``uint32``) -- where dataset decomposition cuts the stream back into documents and in-context
    chains find a document's tokens.  With ``condition`` (``(field, prefix, suffix)``, MeCo's metadata conditioning),
    also ``cond-<k>.bin``: each train document again, after the tokens of ``prefix + metadata[field] + suffix``, and
    ``cond-<k>.msk``: one byte a token of it, 0 on those header tokens (no loss on them) and 1 on the document's."""

    name = "effitrain tokenize"
    type = "🔢 - TOKENIZER"

    def __init__(self, out_dir: str, *, tokenizer_dir: str, eos_id: int, eval_docs: str, dtype: str,
                 batch_size: int = 1000, train_docs: Optional[str] = None, lengths: bool = False,
                 condition: Optional[tuple[str, str, str]] = None, files: Sequence[str] = ()) -> None:
        super().__init__()
        self.files = list(files)  # the corpus's paths, for an error that names one
        self.out_dir, self.tokenizer_dir, self.eos_id, self.eval_docs = out_dir, tokenizer_dir, eos_id, eval_docs
        self.dtype, self.batch_size, self.train_docs, self.lengths = dtype, batch_size, train_docs, lengths
        self.condition = None if condition is None else tuple(condition)

    def _encoder(self):
        """``texts -> [ids]`` without special tokens (packing places its own EOS).  A fast tokenizer's
        ``tokenizer.json`` is loaded with ``tokenizers`` alone -- the ids ``transformers`` would give (it calls the
        same ``encode_batch``), without importing ``transformers`` in every task (seconds each)."""
        backend = Path(self.tokenizer_dir) / "tokenizer.json"
        if backend.is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(backend))
            tok.no_truncation()
            tok.no_padding()
            # the same ids without the character offsets nobody reads here (cheaper; where this version has it)
            encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
            return lambda texts: [e.ids for e in encode_batch(texts, add_special_tokens=False)]
        from transformers import AutoTokenizer  # a slow (Python) tokenizer has no tokenizer.json

        slow = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        return lambda texts: slow(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
        encode = self._encoder()
        eos = self.eos_id
        # the (file, record) lists as sorted int64 keys, 8 bytes a pair; each file reads its own records from them (a
        # Python set of every pair's tuple made every task grow with the selection: 725 MB against 426 MB at 10k for
        # a dedup run keeping most of 1M documents, docs/benchmarks.md)
        eval_keys = document_keys(self.eval_docs)
        # a selection's kept train documents (None: all); the others are neither trained on nor evaluated
        keep_keys = None if self.train_docs is None else document_keys(self.train_docs)
        dtype = np.dtype(self.dtype)
        headers: dict[str, list[int]] = {}  # a header's tokens, once per distinct metadata value
        for file_index, docs in _per_file(data):
            eval_set = records_of(eval_keys, file_index)
            if keep_keys is not None:
                keep = records_of(keep_keys, file_index)
                docs = (d for d in docs if d.metadata["record"] in eval_set or d.metadata["record"] in keep)
            final = Path(self.out_dir) / "tokens" / f"{file_index:06d}"
            tmp = _atomic_dir(final)
            # streams are opened as their domains appear and renamed to their sorted codes when the file is done
            seen: dict[str, int] = {}  # domain -> order of first appearance
            counts: dict[tuple[str, str], int] = {}
            # every file of a stream: (stream, extension, domain) -> its open part file, renamed to the domain's sorted
            # code when the input file is done.  Extensions: bin (tokens), len and rec (a train document's length and
            # record, with `lengths`), msk (the conditioned stream's loss mask, with `condition`)
            parts: dict[tuple[str, str, str], Any] = {}
            try:
                for batch in batched(docs, self.batch_size):
                    with self.track_time("batch"):
                        encoded = encode([d.text for d in batch])
                    pending: dict[tuple[str, str, str], list[int]] = {}  # one write per file and batch
                    for doc, ids in zip(batch, encoded):
                        split = "eval" if doc.metadata["record"] in eval_set else "train"
                        domain = doc.metadata["domain"]
                        seen.setdefault(domain, len(seen))
                        stream = pending.setdefault((split, "bin", domain), [])
                        stream.extend(ids)
                        stream.append(eos)
                        if self.lengths and split == "train":
                            pending.setdefault(("train", "len", domain), []).append(len(ids) + 1)
                            pending.setdefault(("train", "rec", domain), []).append(doc.metadata["record"])
                        if self.condition is not None and split == "train":
                            field, prefix, suffix = self.condition
                            text = f"{prefix}{self._metadata(doc, field)}{suffix}"
                            header = headers.get(text)
                            if header is None:
                                header = headers[text] = encode([text])[0]
                            conditioned = pending.setdefault(("cond", "bin", domain), [])
                            conditioned.extend(header)
                            conditioned.extend(ids)
                            conditioned.append(eos)
                            mask = pending.setdefault(("cond", "msk", domain), [])
                            mask.extend([0] * len(header))
                            mask.extend([1] * (len(ids) + 1))
                    for key, values in pending.items():
                        stream, ext, domain = key
                        fh = parts.get(key)
                        if fh is None:
                            fh = parts[key] = open(tmp / f".{stream}-{seen[domain]}.{ext}.part", "wb")
                        fh.write(np.asarray(values, dtype=_SIDE_DTYPES.get(ext, dtype)).tobytes())
                        if ext == "bin":
                            counts[(stream, domain)] = counts.get((stream, domain), 0) + len(values)
                            if stream != "cond":  # the documents' tokens, once
                                self.stat_update("tokens", value=len(values))
            finally:
                for fh in parts.values():
                    fh.close()
            names = sorted(seen)
            for stream, ext, domain in parts:
                os.replace(tmp / f".{stream}-{seen[domain]}.{ext}.part", tmp / f"{stream}-{names.index(domain)}.{ext}")
            splits = ("train", "eval", "cond") if self.condition is not None else ("train", "eval")
            tokens = {split: [counts.get((split, d), 0) for d in names] for split in splits}
            (tmp / "meta.json").write_text(json.dumps({"domains": names, "tokens": tokens, "dtype": dtype.name}))
            _publish(tmp, final)
        return iter(())

    def _metadata(self, doc: Any, field: str) -> str:
        """A document's ``domain``, or its own ``id`` -- the in-memory builder numbers a record without one by its
        position in the whole corpus, which a task does not know: such a record stops the run in one line."""
        if field != "id":
            return doc.metadata[field]
        if doc.metadata["source_id"] is None:
            from effitrain.data.inspect import short_path

            where = self.files[doc.metadata["file"]] if self.files else f"file #{doc.metadata['file']}"
            raise ConfigError(f"curriculum.metadata_field=id: '{short_path(where)}' record "
                              f"{doc.metadata['record'] + 1} has no 'id'; with data.executor MeCo conditions on "
                              f"the documents' own ids: give every record an 'id' or use metadata_field=domain")
        return doc.metadata["source_id"]


# ------------------------------------------------------------------------------------------------------ executors
class SlurmArray(SlurmPipelineExecutor):
    """datatrove's SLURM executor as effitrain's stages use it, for a run that waits on its own arrays:

    * a null partition (the presets' default) is left to the cluster, as for the training jobs (datatrove would
      write ``--partition=None``);
    * the memory is the preset's ``mem_gb`` per task, as ``--mem`` (datatrove asks per CPU in whole GB);
    * no stats-merging job: datatrove submits one ``afterok`` the array, which after a failed task would wait in
      the queue forever; the per-task stats stay in ``logs/stats``;
    * ``sbatch`` runs without the ``SLURM_*`` environment of a job it may be called from (a training job on the
      cluster): ``--export=ALL`` would hand that job's ``SLURM_MEM_PER_NODE``, ``SLURM_CPUS_PER_TASK``, ... to the
      array, whose ``srun`` then mixes them with its own (``SLURM_MEM_PER_CPU and SLURM_MEM_PER_NODE are mutually
      exclusive``)."""

    def __init__(self, *args: Any, mem_gb: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mem_gb = mem_gb

    def get_sbatch_args(self, max_array: int = 1) -> dict:
        args = super().get_sbatch_args(max_array)
        if args.get("partition") is None:
            del args["partition"]
        # the preset's memory whole (datatrove asks per CPU in whole GB: 10 GB over 4 CPUs would become 8)
        del args["mem-per-cpu"]
        return {**args, "mem": f"{self.mem_gb}G"}

    def launch_merge_stats(self) -> None:
        pass

    def launch_job(self) -> None:
        saved = {k: v for k, v in os.environ.items() if k.startswith("SLURM_") and k != "SLURM_CONF"}
        for key in saved:
            del os.environ[key]
        try:
            super().launch_job()
        finally:
            os.environ.update(saved)


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (``PR_SET_PDEATHSIG``); exit at once if the parent is
    already gone.  Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died between the fork and the prctl
        os._exit(1)


class _DieWithParent:
    """multiprocess's after-fork hook while a stage runs: a forked child dies with the process that forked it.  The
    child's copy then names the child, so a process it forks in turn (a step's own pool) dies with it, not with the
    driver.  Registered for the stage only (the registry holds it weakly): ``PR_SET_PDEATHSIG`` follows the thread
    that forked, and a later fork from a short-lived thread would be killed when that thread ends."""

    def __init__(self) -> None:
        self.pid = os.getpid()

    def after_fork(self) -> None:
        die_with_parent(self.pid)
        self.pid = os.getpid()


try:
    from datatrove.executor import LocalPipelineExecutor as _LocalPipelineExecutor
except ImportError:  # pragma: no cover - without the `data` extra
    _LocalPipelineExecutor = object


class LocalTasks(_LocalPipelineExecutor):
    """datatrove's local executor, whose processes die with the launch that started them.

    datatrove forks a ``multiprocess`` Manager (even for one worker) and a pool of workers; a launch killed with
    SIGKILL (the OOM killer, ``kill -9``, a preempted node) left them running: the manager sleeping forever, and a
    worker finishing its task -- writing outputs and a completion marker -- beside the relaunch that redoes the same
    task.  Each forked child (manager, fork workers) now asks for SIGKILL at its parent's death in multiprocess's
    after-fork hook; a spawned worker asks when it starts a task."""

    def run(self) -> Any:
        import multiprocess.util

        hook = _DieWithParent()  # alive for this call only: then the registry's weak entry is gone
        multiprocess.util.register_after_fork(hook, _DieWithParent.after_fork)
        self.parent_pid = hook.pid
        return super().run()

    def _launch_run_for_rank(self, rank: int, ranks_q: Any, completed: Any = None, completed_lock: Any = None):
        if os.getpid() != self.parent_pid:  # a spawned pool worker: it has run no after-fork hook
            die_with_parent(self.parent_pid)
            self.parent_pid = os.getpid()
        return super()._launch_run_for_rank(rank, ranks_q, completed, completed_lock)


@dataclass(frozen=True)
class EngineSettings:
    """Where a stage's tasks run, in this layer's own terms: the run's validated ``data:`` section turns itself into
    one (:meth:`effitrain.config.blocks.data_engine.DataParams.engine_settings`), so the data layer never reads the
    config or the launcher presets."""

    executor: str                  # local | slurm | ray
    tasks: int = 1
    workers: Optional[int] = None  # tasks at once; None: local = min(tasks, CPUs), slurm/ray = all
    slurm: dict = field(default_factory=dict)  # partition, account, qos, cpus_per_task, mem_gb, timeout_min, name


def make_executor(params: EngineSettings, pipeline: list[Any], logging_dir: Path, *, job_name: str) -> Any:
    """datatrove's executor for ``params.executor``."""
    try:
        import datatrove  # noqa: F401
    except ImportError:
        raise ConfigError(f"data.executor={params.executor}: needs datatrove; {INSTALL}") from None
    if params.executor == "local":
        workers = params.workers or min(params.tasks, os.cpu_count() or 1)
        # fork, not datatrove's default forkserver: the workers inherit the imported steps (seconds saved per
        # task), and this process holds no threads while a stage runs.  A step that runs CUDA (a reference model on
        # the GPU) asks for fresh processes instead: CUDA, once initialized here, cannot be used in a forked child
        spawn = any(getattr(step, "needs_fresh_process", False) for step in pipeline)
        return LocalTasks(pipeline, tasks=params.tasks, workers=workers, logging_dir=str(logging_dir),
                          start_method="spawn" if spawn else "fork")
    if params.executor == "slurm":
        res = params.slurm
        sbatch = {key: res[key] for key in ("account",) if res.get(key)}
        cpus = int(res["cpus_per_task"])
        return SlurmArray(pipeline, tasks=params.tasks, workers=params.workers or -1,
                          time=f"{int(res['timeout_min'])}:00", partition=res.get("partition"), qos=res.get("qos"),
                          cpus_per_task=cpus, mem_gb=int(res["mem_gb"]),
                          job_name=f"{res.get('name') or 'effitrain'}-{job_name}", logging_dir=str(logging_dir),
                          venv_path=_venv_activate(), sbatch_args=sbatch or None, requeue=True)
    try:
        import ray
    except ImportError:
        raise ConfigError("data.executor=ray: needs Ray; pip install 'effitrain[ray]' (then `ray start` on the "
                          "nodes of a cluster), or use data.executor=local|slurm") from None
    from datatrove.executor.ray import RayPipelineExecutor

    if not ray.is_initialized():
        # the cluster of RAY_ADDRESS, else the one `ray start` made on this machine, else a local Ray of this
        # machine's cores (what datatrove leaves to its caller); its own logs stay out of the terminal
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False, include_dashboard=False)
    return RayPipelineExecutor(pipeline, tasks=params.tasks, workers=params.workers or -1,
                               logging_dir=str(logging_dir))


def _venv_activate() -> Optional[str]:
    import sys

    activate = Path(sys.prefix) / "bin" / "activate"
    return str(activate) if activate.is_file() else None


def run_stage(params: EngineSettings, pipeline: list[Any], stage_dir: Path, *, job_name: str,
              poll_s: float = 10.0) -> list[int]:
    """Run one stage to completion: every task marked done.  The tasks marked by an earlier launch are skipped (a
    line says which run); returns the ranks this launch ran.  On SLURM this process waits for the array: the next
    step (a reduce here, then the next stage or training) needs every task's output."""
    import time

    from effitrain.console import say

    logging_dir = stage_dir / "logs"
    executor = make_executor(params, pipeline, logging_dir, job_name=job_name)
    todo = list(executor.get_incomplete_ranks())
    done = params.tasks - len(todo)
    start = time.perf_counter()
    if todo:
        say(f"data: {job_name}: {len(todo)} of {params.tasks} tasks to run"
            + (f" ({done} done by an earlier launch; running {_ranks_text(todo)})" if done else "")
            + f" on {params.executor}")
        if params.executor == "slurm":
            if shutil.which("sbatch") is None:
                raise ConfigError("data.executor=slurm: 'sbatch' is not on PATH; launch from a SLURM login node (or "
                                  "a job), or use data.executor=local")
            # submit, whatever the environment: datatrove's run() takes a process with SLURM_ARRAY_TASK_ID for one
            # of its own tasks, and a sweep member (submitit submits sweeps as job arrays) has one
            executor.launch_job()
        else:
            executor.run()
    if params.executor == "slurm" and todo:  # sbatch returned at submission: wait for the array to mark its tasks
        job_id = executor.job_id
        say(f"data: {job_name}: SLURM job {job_id}, waiting for its {len(todo)} tasks (logs: {logging_dir})")
        wait = 0.5  # short stages finish in seconds; long ones are polled every poll_s
        while executor.get_incomplete_ranks():
            # the markers read again after squeue: a task that marks itself and leaves in between is no failure
            if not _slurm_job_alive(job_id) and (missing := executor.get_incomplete_ranks()):
                raise RunFailed(f"data.executor=slurm: job {job_id} ({job_name}) ended with {len(missing)} of "
                                f"{params.tasks} tasks unfinished ({_ranks_text(missing)}; their logs: "
                                f"{logging_dir / 'slurm_logs'}); launch again to redo only those")
            time.sleep(wait)
            wait = min(poll_s, wait * 2)
    missing = executor.get_incomplete_ranks()
    if missing:
        raise ConfigError(f"data: {len(missing)} of {params.tasks} tasks of the {job_name} stage did not finish "
                          f"(first: task {missing[0]}, logs in {logging_dir}/logs); launch again to redo only those")
    if todo:
        say(f"data: {job_name}: done in {time.perf_counter() - start:.1f} s")
    return todo


def _ranks_text(ranks: list[int]) -> str:
    return "task " + str(ranks[0]) if len(ranks) == 1 else "tasks " + ", ".join(map(str, ranks[:8])) + (
        ", ..." if len(ranks) > 8 else "")


def finish_stage(stage_dir: Path) -> None:
    """Drop a stage's outputs and completion markers once its reduce has used them (they are as big as the corpus's
    tokens); its task logs (``logs/logs``, ``logs/stats``) stay, small, for reading what ran.  Without the markers a
    later build of the same stage starts afresh instead of skipping tasks whose outputs are gone."""
    for child in stage_dir.iterdir() if stage_dir.is_dir() else ():
        if child.name == "logs":
            continue
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    shutil.rmtree(stage_dir / "logs" / "completions", ignore_errors=True)


def _slurm_job_alive(job_id: str) -> bool:
    import subprocess

    out = subprocess.run(["squeue", "-h", "-j", str(job_id)], capture_output=True, text=True)
    return bool(out.stdout.strip())
