#!/usr/bin/env python
"""pitstop benchmarks: every workload of the performance contract, side by side in one run.

Each workload times pitstop and its baseline (the raw disk, a memory copy, or another
checkpoint library) in the same process on the same machine, and reports medians and the
ratio against the target of DESIGN.md section 9 / issue 5. Run from the repository root::

    .venv/bin/python benchmarks/run.py                      # full run (~11-14 min on 2 cores)
    .venv/bin/python benchmarks/run.py --quick              # smoke run, small sizes
    .venv/bin/python benchmarks/run.py --only big,small --no-anchors
    .venv/bin/python benchmarks/run.py --markdown /tmp/bench.md

Workloads: big, small, async, incremental, keras, scaling, compression. "Durable" means
the bytes are written and fsync'd and the directory entry is fsync'd. TensorFlow, Keras, safetensors and
torch are imported lazily, only by the cases that need them, and skipped with a note when
they are missing. Everything is written below a scratch directory that is removed at the
end.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import importlib
import importlib.metadata
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import pitstop

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
WORKLOADS = ("big", "small", "async", "incremental", "keras", "scaling", "compression")
_DROP_CACHES = "/proc/sys/vm/drop_caches"


# ----------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------
@dataclass
class Config:
    big_bytes: int = GiB
    big_arrays: int = 64
    small_arrays: int = 20_000
    small_bytes: int = 4 * KiB
    changed_arrays: int = 6  # of big_arrays, for the incremental workload
    keras_hidden: tuple[int, ...] = (2048, 2048, 2048)
    keras_input: int = 1000
    scaling_bytes: tuple[int, ...] = (64 * MiB, 256 * MiB, GiB)
    scaling_counts: tuple[int, ...] = (10, 1_000, 10_000, 100_000)
    scaling_array_bytes: int = 16 * MiB
    tiny_bytes: int = KiB
    compression_bytes: int = 256 * MiB
    repeat: int = 3
    heavy_repeat: int = 2  # slow anchors (tf.train.Checkpoint of 20,000 variables, ...)

    @classmethod
    def quick(cls, repeat: int | None) -> Config:
        return cls(
            big_bytes=128 * MiB,
            small_arrays=1_000,
            keras_hidden=(256, 256),
            scaling_bytes=(16 * MiB, 32 * MiB, 64 * MiB),
            scaling_counts=(10, 100, 1_000),
            scaling_array_bytes=2 * MiB,
            compression_bytes=32 * MiB,
            repeat=repeat or 1,
            heavy_repeat=1,
        )


# ----------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------
@dataclass
class Row:
    """One measured case: the median of its runs, and optionally a ratio with a target."""

    workload: str
    case: str
    runs: list[float] = field(default_factory=list)  # seconds
    nbytes: int | None = None  # for GB/s
    vs: str | None = None  # what the ratio is taken against
    ratio: float | None = None
    target: tuple[str, float] | None = None  # ("<=", 1.1) or (">=", 20)
    value: str | None = None  # shown instead of seconds (e.g. a byte ratio)
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.runs) if self.runs else None

    @property
    def ok(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        op, val = self.target
        return self.ratio <= val if op == "<=" else self.ratio >= val


class Results:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.notes: list[str] = []

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        _print_row(row)
        return row

    def get(self, workload: str, case: str) -> Row:
        for r in self.rows:
            if r.workload == workload and r.case == case:
                return r
        raise KeyError((workload, case))

    def compare(self, row: Row, base: Row, *, label: str, target: tuple[str, float] | None = None) -> None:
        """Set ``row.ratio = row / base`` (medians), with the base's label and a target."""
        if row.median is not None and base.median:
            row.ratio = row.median / base.median
        row.vs = label
        row.target = target

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 10:
        return f"{s:.1f} s"
    if s >= 0.1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def _fmt_gbs(row: Row) -> str:
    m = row.median
    if not row.nbytes or not m or row.value is not None:
        return ""
    return f"{row.nbytes / m / 1e9:.2f}"


def _fmt_spread(row: Row) -> str:
    if len(row.runs) < 2:
        return f"{len(row.runs)}" if row.runs else ""
    return f"{len(row.runs)}: {_fmt_s(min(row.runs))}-{_fmt_s(max(row.runs))}"


def _fmt_ratio(row: Row) -> str:
    if row.ratio is None:
        return ""
    r = row.ratio
    text = f"{r:.3f}" if r < 0.1 else f"{r:.2f}" if r < 100 else f"{r:.0f}"
    return f"{text}x {row.vs}"


def _fmt_target(row: Row) -> str:
    if row.target is None:
        return ""
    op, val = row.target
    return f"{'≤' if op == '<=' else '≥'} {val:g}"


def _fmt_ok(row: Row) -> str:
    ok = row.ok
    return "" if ok is None else "PASS" if ok else "MISS"


COLUMNS = ("workload", "case", "median", "GB/s", "runs: min-max", "ratio", "target", "", "note")


def _cells(row: Row) -> list[str]:
    value = row.value if row.value is not None else _fmt_s(row.median)
    return [
        row.workload,
        row.case,
        value,
        _fmt_gbs(row),
        _fmt_spread(row),
        _fmt_ratio(row),
        _fmt_target(row),
        _fmt_ok(row),
        row.note,
    ]


def _print_row(row: Row) -> None:
    c = _cells(row)
    extra = f"  [{c[5]}; target {c[6]} {c[7]}]" if c[6] else (f"  [{c[5]}]" if c[5] else "")
    gbs = f"  {c[3]} GB/s" if c[3] else ""
    print(f"  {row.workload:<11} {row.case:<52} {c[2]:>10}{gbs}{extra}", flush=True)


def text_table(rows: Sequence[Row]) -> str:
    table = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    out = []
    for j, line in enumerate(table):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown_table(rows: Sequence[Row]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    out += ["| " + " | ".join(esc(c) for c in _cells(r)) + " |" for r in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------
# the machine and the disk
# ----------------------------------------------------------------------------------------
def _run(cmd: Sequence[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _meminfo() -> str:
    info = {}
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            k, _, v = line.partition(":")
            info[k] = int(v.split()[0]) * KiB
    if not info:
        return "unknown"
    return f"{info.get('MemTotal', 0) / GiB:.1f} GiB total, {info.get('MemAvailable', 0) / GiB:.1f} GiB available"


def _filesystem(path: str) -> str:
    df = _run(["df", "-PT", path]).splitlines()
    if len(df) >= 2:
        parts = df[1].split()
        if len(parts) >= 7:
            return f"{parts[1]} on {parts[0]} mounted at {parts[6]} ({int(parts[4]) * 1024 / GiB:.0f} GiB free)"
    return "unknown"


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def _git_revision() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    rev = _run(["git", "-C", here, "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"])
    return f"{rev}{' (+ uncommitted changes)' if dirty else ''}" if rev else "unknown"


def header_lines(args: argparse.Namespace, scratch: str, cache_method: str) -> list[str]:
    versions = [f"Python {platform.python_version()}", f"NumPy {np.__version__}", f"pitstop {pitstop.__version__}"]
    for dist, name in (
        ("tensorflow-cpu", "TensorFlow"),
        ("tensorflow", "TensorFlow"),
        ("keras", "Keras"),
        ("safetensors", "safetensors"),
        ("torch", "torch"),
        ("xxhash", "xxhash"),
    ):
        v = _version(dist)
        if v and not any(s.startswith(name + " ") for s in versions):
            versions.append(f"{name} {v}")
    nproc = _run(["nproc"]) or str(os.cpu_count())
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    cmd = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv])
    return [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine: {platform.node()}, {platform.system()} {platform.release()}, {_cpu_model()}",
        f"nproc: {nproc} (os.cpu_count {os.cpu_count()}); load average at start: {load}",
        f"memory: {_meminfo()}",
        f"scratch: {scratch} — {_filesystem(scratch)}",
        f"cold reads: {cache_method}",
        f"before each measurement: sync, pause {args.settle_effective:g} s per GiB about to move"
        + ("" if args.no_prefault else ", first-touch that much memory (VM host page faults off the clock)"),
        f"versions: {', '.join(versions)}",
        f"pitstop revision: {_git_revision()}",
        f"command: {cmd}",
        f"mode: {'quick' if args.quick else 'full'}, repeat {args.repeat_effective} (heavy anchors "
        f"{args.heavy_effective}); medians of the runs; GB/s = 1e9 bytes/s",
    ]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files_under(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    out = []
    for root, _, names in os.walk(path):
        out += [os.path.join(root, n) for n in names]
    return out


def _fsync_files(paths: Iterable[str]) -> None:
    """Durability for libraries that do not fsync: each file, then each directory once."""
    dirs = set()
    for p in paths:
        for f in _files_under(p):
            _fsync_file(f)
            dirs.add(os.path.dirname(f))
    for d in sorted(dirs):
        _fsync_dir(d)


def _rm(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class ColdCache:
    """Evicts files from the page cache before a cold read, and checks it worked."""

    def __init__(self) -> None:
        self.drop_caches = False
        try:
            os.sync()
            with open(_DROP_CACHES, "w") as f:
                f.write("1\n")
            self.drop_caches = True
        except OSError:
            pass
        self.residency: list[float] = []
        self._libc: Any = None

    @property
    def method(self) -> str:
        how = "posix_fadvise(POSIX_FADV_DONTNEED) on every file"
        if self.drop_caches:
            how += f" + sync and `echo 3 > {_DROP_CACHES}`"
        else:
            how += f" ({_DROP_CACHES} not writable)"
        return how

    def evict(self, paths: Iterable[str]) -> None:
        files = [f for p in paths for f in _files_under(p)]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        if self.drop_caches:
            os.sync()
            with open(_DROP_CACHES, "w") as fh:
                fh.write("3\n")
        if files:
            self.residency.append(self.resident_fraction(files))

    def resident_fraction(self, files: Sequence[str]) -> float:
        """Fraction of the files' pages in the page cache (mincore), 0..1."""
        if self._libc is None:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_long,
            ]
            libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            self._libc = libc
        libc = self._libc
        page = os.sysconf("SC_PAGE_SIZE")
        total = resident = 0
        for f in files:
            size = os.path.getsize(f)
            if not size:
                continue
            fd = os.open(f, os.O_RDONLY)
            try:
                addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED: no page is faulted in
                if addr in (None, ctypes.c_void_p(-1).value):
                    continue
                try:
                    vec = np.zeros((size + page - 1) // page, np.uint8)
                    if libc.mincore(addr, size, vec.ctypes.data) == 0:
                        resident += int((vec & 1).sum())
                        total += vec.size
                finally:
                    libc.munmap(addr, size)
            finally:
                os.close(fd)
        return resident / total if total else 0.0


def _affine_fit(points: Sequence[tuple[int, float]]) -> tuple[float, float] | None:
    """Least squares ``t = fixed + per_byte * n`` over (n, t) points (None with fewer than 2)."""
    if len(points) < 2:
        return None
    xs = np.array([p[0] for p in points], dtype=np.float64)
    ts = np.array([p[1] for p in points], dtype=np.float64)
    per_byte, fixed = np.polyfit(xs, ts, 1)
    return float(fixed), float(per_byte)


# ----------------------------------------------------------------------------------------
# raw baselines
# ----------------------------------------------------------------------------------------
def _u8(a: np.ndarray) -> memoryview:
    return a.reshape(-1).view(np.uint8).data


def raw_write_files(directory: str, arrays: Sequence[np.ndarray]) -> None:
    """One plain file per array: write, fsync each file, then fsync the directory."""
    for i, a in enumerate(arrays):
        fd = os.open(os.path.join(directory, f"{i:06d}.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = _u8(a)
            pos = 0
            while pos < view.nbytes:
                pos += os.write(fd, view[pos:])
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(directory)


def raw_write_files_threaded(directory: str, arrays: Sequence[np.ndarray], threads: int) -> None:
    """:func:`raw_write_files` with the files spread over ``threads`` threads (as pitstop's pool)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> None:
        fd = os.open(os.path.join(directory, f"{i:06d}.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = _u8(arrays[i])
            pos = 0
            while pos < view.nbytes:
                pos += os.write(fd, view[pos:])
            os.fsync(fd)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(len(arrays))))
    _fsync_dir(directory)


def _pitstop_threads() -> int:
    """The IO thread count pitstop's manager picks by default on this machine."""
    from pitstop._manager._reader import default_threads

    return default_threads()


def raw_read_files(directory: str, arrays: Sequence[np.ndarray]) -> None:
    """Read each array's file into the given (existing) array with readinto."""
    for i, a in enumerate(arrays):
        with open(os.path.join(directory, f"{i:06d}.bin"), "rb", buffering=0) as f:
            view = _u8(a)
            pos = 0
            while pos < view.nbytes:
                n = f.readinto(view[pos:])
                if not n:
                    raise EOFError(f"short file for array {i}")
                pos += n


def _iov_batches(arrays: Sequence[np.ndarray], size: int = 1024) -> Iterable[list[memoryview]]:
    for i in range(0, len(arrays), size):
        yield [_u8(a) for a in arrays[i : i + size]]


def raw_write_one_file(path: str, arrays: Sequence[np.ndarray]) -> None:
    """Every array's bytes back to back in one file (writev), fsync'd with its directory."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for batch in _iov_batches(arrays):
            want = sum(v.nbytes for v in batch)
            n = os.writev(fd, batch)
            if n != want:  # a short writev: finish the batch buffer by buffer
                for v in batch:
                    take = min(n, v.nbytes)
                    n -= take
                    rest = v[take:]
                    while rest.nbytes:
                        rest = rest[os.write(fd, rest) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(os.path.dirname(path))


def raw_read_one_file(path: str, arrays: Sequence[np.ndarray]) -> None:
    """Read the one file straight into the given arrays (preadv scatter)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        for batch in _iov_batches(arrays):
            want = sum(v.nbytes for v in batch)
            n = os.preadv(fd, batch, offset)
            if n != want:
                raise EOFError("short read")
            offset += n
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------
# the benchmark harness
# ----------------------------------------------------------------------------------------
def _random_arrays(count: int, nbytes: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    n = nbytes // 4
    return [rng.random(n, dtype=np.float32) for _ in range(count)]


def _as_state(arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    width = len(str(len(arrays) - 1))
    return {f"a{i:0{width}d}": a for i, a in enumerate(arrays)}


def _touched_like(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.zeros_like(a) for a in arrays]


def _free() -> None:
    gc.collect()


class Bench:
    def __init__(self, args: argparse.Namespace, cfg: Config, scratch: str) -> None:
        self.args = args
        self.cfg = cfg
        self.scratch = scratch
        self.res = Results()
        self.cache = ColdCache()
        self._tf: Any = None
        self._tf_error: str | None = None
        self._counter = 0

    # -- helpers ----------------------------------------------------------------------
    def path(self, name: str) -> str:
        self._counter += 1
        return os.path.join(self.scratch, f"{self._counter:04d}-{name}")

    def tf(self) -> Any:
        """TensorFlow, imported on first use (None, with a note, when unavailable)."""
        if self._tf is None and self._tf_error is None:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            t0 = time.perf_counter()
            try:
                self._tf = importlib.import_module("tensorflow")
            except Exception as exc:  # ImportError, or a broken install
                self._tf_error = f"{type(exc).__name__}: {exc}"
                self.res.note(f"TensorFlow unavailable ({self._tf_error}): its anchors are skipped")
            else:
                print(f"  (imported TensorFlow {self._tf.__version__} in {time.perf_counter() - t0:.1f} s)", flush=True)
        return self._tf

    def manager(self, directory: str, **kw: Any) -> tuple[pitstop.CheckpointManager, float]:
        """A manager whose directory is initialized by a 1-element warm-up save (untimed).

        Returns the manager and how long that first save (layout, lock, fsyncs) took.
        """
        kw.setdefault("async_save", False)
        kw.setdefault("max_to_keep", None)
        mgr = pitstop.CheckpointManager(directory, **kw)
        t0 = time.perf_counter()
        mgr.save(0, {"warmup": np.zeros(1, np.float32)})
        mgr.wait_until_finished()
        return mgr, time.perf_counter() - t0

    def settle(self, nbytes: int, *, read: bool = False) -> None:
        """Put the machine in the same state before every measurement (see --settle).

        Nothing dirty from earlier steps may be flushed inside a measurement (sync); the
        host has time to absorb the previous write (sleep, scaled by the bytes about to
        move); and the memory the operation is about to touch (page cache, fresh arrays) is
        first-touched beforehand, so that the VM's host-level page faults on memory the
        guest freed earlier (0.6-2.5 s per GiB here, at random) land on nobody. A read
        (``read=True``) moves nothing to the disk, so it pauses a third as long.
        """
        os.sync()
        if nbytes <= 0:
            return
        if self.args.settle_effective > 0:
            pause = self.args.settle_effective * max(0.1, nbytes / GiB)
            time.sleep(pause / 3 if read else pause)
        if not self.args.no_prefault:
            scratch = np.empty(int(nbytes * 1.1) + 16 * MiB, np.uint8)
            scratch.fill(1)
            del scratch

    def timed(self, fn: Callable[[], Any], nbytes: int, *, read: bool = False) -> float:
        """Seconds ``fn`` takes, after :meth:`settle` for an operation touching ``nbytes``."""
        self.settle(nbytes, read=read)
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    @property
    def repeat(self) -> int:
        return int(self.args.repeat_effective)

    @property
    def heavy(self) -> int:
        return int(self.args.heavy_effective)

    # -- anchors shared by big and small -------------------------------------------------
    def save_load(
        self,
        workload: str,
        name: str,
        save: Callable[[str], float | None],
        load: Callable[[str], Any],
        *,
        nbytes: int,
        rep: int,
        save_vs: tuple[Row, str, tuple[str, float] | None],
        load_vs: tuple[Row, str],
        load_case: str = "load (fresh arrays)",
        returns_case: str | None = None,
        returns_vs: Row | None = None,
    ) -> Row:
        """Time ``rep`` durable saves (``save(path)``, then an fsync of everything under
        ``path``) and ``rep`` cold loads of the last one; add their rows and ratios.

        ``save`` may return the seconds until it returned control (a library that writes
        in the background or without fsync); they go to a row ``returns_case``, compared
        with ``returns_vs`` (the raw durable write).

        Returns:
            The save row.
        """
        saves, returns, loads, path = [], [], [], ""
        for _ in range(rep):
            _rm(path)
            path = self.path(name.split()[0])
            box: list[float | None] = []
            saves.append(self.timed(lambda p=path, b=box: (b.append(save(p)), _fsync_files([p])), nbytes))
            if box and box[0] is not None:
                returns.append(box[0])
        for _ in range(rep):
            self.cache.evict([path])
            out: list[Any] = []
            loads.append(self.timed(lambda p=path, o=out: o.append(load(p)), 2 * nbytes, read=True))
            del out
            _free()
        _rm(path)
        if returns_case is not None:
            row = self.res.add(Row(workload, f"{name} {returns_case}", returns, nbytes))
            if returns_vs is not None:
                self.res.compare(row, returns_vs, label="raw")
        save_row = self.res.add(Row(workload, f"{name} save + fsync", saves, nbytes))
        base, label, target = save_vs
        self.res.compare(save_row, base, label=label, target=target)
        row = self.res.add(Row(workload, f"{name} {load_case}", loads, nbytes))
        self.res.compare(row, load_vs[0], label=load_vs[1])
        return save_row

    def anchors(
        self, workload: str, arrays: list[np.ndarray], raw_save: Row, raw_read_fresh: Row, pit_save: Row, heavy: bool
    ) -> None:
        nbytes = sum(a.nbytes for a in arrays)
        rep = self.heavy if heavy else self.repeat
        state = _as_state(arrays)
        vs_raw: tuple[Row, str, tuple[str, float] | None] = (raw_save, "raw", None)
        fresh = (raw_read_fresh, "raw fresh")

        def npz_load(p: str) -> list[np.ndarray]:
            with np.load(p) as z:
                return [z[k] for k in z.files]

        def npz_save(p: str) -> None:
            with open(p, "wb") as f:
                np.savez(f, **state)

        self.save_load(workload, "np.savez", npz_save, npz_load, nbytes=nbytes, rep=rep, save_vs=vs_raw, load_vs=fresh)
        try:
            st = importlib.import_module("safetensors.numpy")
        except ImportError as exc:
            self.res.note(f"safetensors not installed ({exc}): skipped")
        else:
            self.save_load(
                workload, "safetensors save_file", lambda p: st.save_file(state, p), st.load_file,
                nbytes=nbytes, rep=rep, save_vs=vs_raw, load_vs=fresh,
            )  # fmt: skip
        try:
            torch = importlib.import_module("torch")
        except ImportError:
            if workload == "big":
                self.res.note("torch is not installed: the torch.save anchor is skipped")
        else:
            tstate = {k: torch.from_numpy(v) for k, v in state.items()}
            self.save_load(
                workload, "torch.save", lambda p: torch.save(tstate, p), lambda p: torch.load(p),
                nbytes=nbytes, rep=rep, save_vs=vs_raw, load_vs=fresh,
            )  # fmt: skip
            del tstate

        # tf.train.Checkpoint, sync and async
        if self.args.no_tf:
            return
        tf = self.tf()
        if tf is None:
            return
        t0 = time.perf_counter()
        variables = [tf.Variable(a) for a in arrays]
        print(f"  (created {len(variables)} tf.Variables in {time.perf_counter() - t0:.1f} s)", flush=True)
        ckpt = tf.train.Checkpoint(vars=variables)

        def tf_save(d: str) -> float:
            os.makedirs(d)
            t0 = time.perf_counter()
            ckpt.write(os.path.join(d, "ckpt"))
            return time.perf_counter() - t0

        small = workload == "small"
        self.save_load(
            workload, "tf.train.Checkpoint", tf_save, lambda d: ckpt.read(os.path.join(d, "ckpt")),
            nbytes=nbytes, rep=rep, load_case="read (in place)", returns_case="write() (no fsync, as TF does)",
            returns_vs=raw_save,
            save_vs=(pit_save, "pitstop", (">=", 20)) if small else vs_raw, load_vs=fresh,
        )  # fmt: skip
        if small:
            self.res.rows[-2].note = "target: pitstop ≥ 20x faster"
        ok = all(np.array_equal(v.numpy(), a) for v, a in zip(variables[:4], arrays[:4], strict=True))
        if not ok:
            self.res.rows[-1].note = "READ BACK WRONG DATA"

        # async: the first write traces and allocates, so it is a warm-up
        opts = tf.train.CheckpointOptions(experimental_enable_async_checkpoint=True)
        actk = tf.train.Checkpoint(vars=variables)
        d = self.path("tfasync")
        os.makedirs(d)
        t0 = time.perf_counter()
        actk.write(os.path.join(d, "warmup"), options=opts)
        warm_returns = time.perf_counter() - t0
        actk.sync()
        warm = time.perf_counter() - t0
        returns, synced, fsynced = [], [], []
        # with 20,000 variables a later async write() takes about a minute here: time one
        for k in range(1 if heavy else rep):
            p = os.path.join(d, f"ckpt{k}")
            self.settle(nbytes)
            t0 = time.perf_counter()
            actk.write(p, options=opts)
            t1 = time.perf_counter()
            actk.sync()
            t2 = time.perf_counter()
            _fsync_files([d])
            t3 = time.perf_counter()
            returns.append(t1 - t0)
            synced.append(t2 - t0)
            fsynced.append(t3 - t0)
            for f in _files_under(d):
                if os.path.basename(f).startswith(f"ckpt{k}"):
                    os.unlink(f)
        _rm(d)
        self.res.add(Row(workload, "tf.train.Checkpoint async: write() returns", returns, nbytes))
        self.res.add(Row(workload, "tf.train.Checkpoint async: until sync()", synced, nbytes))
        row = self.res.add(Row(workload, "tf.train.Checkpoint async: sync() + fsync", fsynced, nbytes))
        self.res.compare(row, raw_save, label="raw")
        row.note = f"1st async write (untimed warm-up): returned after {warm_returns:.2f} s, synced after {warm:.2f} s"

    # -- workloads ----------------------------------------------------------------------
    def big(self) -> None:
        cfg, wl = self.cfg, "big"
        n = cfg.big_arrays
        arrays = _random_arrays(n, cfg.big_bytes // n, seed=1)
        nbytes = sum(a.nbytes for a in arrays)
        state = _as_state(arrays)
        print(f"big: {nbytes / GiB:.3f} GiB in {n} float32 arrays", flush=True)

        raw_saves, pit_saves, first_saves, raw_par = [], [], [], []
        threads = _pitstop_threads()
        raw_dir = pit_dir = ""
        for _ in range(self.repeat):
            _rm(raw_dir)
            _rm(pit_dir)
            raw_dir = self.path("raw")
            os.makedirs(raw_dir)
            raw_saves.append(self.timed(lambda d=raw_dir: raw_write_files(d, arrays), nbytes))
            par_dir = self.path("raw-threads")
            os.makedirs(par_dir)
            raw_par.append(self.timed(lambda d=par_dir: raw_write_files_threaded(d, arrays, threads), nbytes))
            _rm(par_dir)
            pit_dir = self.path("pitstop")
            mgr, first = self.manager(pit_dir)
            first_saves.append(first)
            pit_saves.append(self.timed(lambda m=mgr: m.save(1, state), nbytes))
            written = mgr.last_save_stats.bytes_written if mgr.last_save_stats else 0
            mgr.close()
        raw_save = self.res.add(Row(wl, "raw: per-array write + fsync each + fsync dir", raw_saves, nbytes))
        pit_save = self.res.add(Row(wl, "pitstop save (sync, durable)", pit_saves, nbytes))
        self.res.compare(pit_save, raw_save, label="raw", target=("<=", 1.1))
        pit_save.note = f"{written / MiB:.0f} MiB written"
        row = self.res.add(Row(wl, f"raw: same on {threads} threads (info: a parallel raw writer)", raw_par, nbytes))
        self.res.compare(row, pit_save, label="pitstop")

        # restores, cold: in place into existing arrays, and into fresh arrays
        _, raw_read_fresh = self._restores(
            wl, arrays, raw_dir, pit_dir, raw_read_files, "read", nbytes, target=("<=", 1.2)
        )
        row = self.res.add(Row(wl, "pitstop: first save into a new directory (1 element)", first_saves))
        row.note = "layout + lock + fsyncs; excluded from the saves above"
        _rm(raw_dir)
        _rm(pit_dir)
        if not self.args.no_anchors:
            self.anchors(wl, arrays, raw_save, raw_read_fresh, pit_save, heavy=False)

    def small(self) -> None:
        cfg, wl = self.cfg, "small"
        n = cfg.small_arrays
        arrays = _random_arrays(n, cfg.small_bytes, seed=2)
        nbytes = sum(a.nbytes for a in arrays)
        state = _as_state(arrays)
        print(f"small: {n} float32 arrays of {cfg.small_bytes} bytes ({nbytes / MiB:.1f} MiB)", flush=True)

        raw_saves, pit_saves = [], []
        raw_dir = pit_dir = ""
        for _ in range(self.repeat):
            _rm(raw_dir)
            _rm(pit_dir)
            raw_dir = self.path("raw")
            os.makedirs(raw_dir)
            raw_file = os.path.join(raw_dir, "all.bin")
            raw_saves.append(self.timed(lambda f=raw_file: raw_write_one_file(f, arrays), nbytes))
            pit_dir = self.path("pitstop")
            mgr, _ = self.manager(pit_dir)
            pit_saves.append(self.timed(lambda m=mgr: m.save(1, state), nbytes))
            stats = mgr.last_save_stats
            mgr.close()
        raw_save = self.res.add(Row(wl, "raw: one file, writev + fsync + fsync dir", raw_saves, nbytes))
        pit_save = self.res.add(Row(wl, "pitstop save (sync, durable)", pit_saves, nbytes))
        self.res.compare(pit_save, raw_save, label="raw", target=("<=", 2.0))
        if stats is not None:
            pit_save.note = f"{stats.objects_written} objects, {stats.bytes_written / MiB:.1f} MiB written"
        manifest_size = sum(os.path.getsize(f) for f in _files_under(os.path.join(pit_dir, "manifests")))

        in_place, raw_read_fresh = self._restores(
            wl, arrays, raw_dir, pit_dir, lambda _d, t: raw_read_one_file(raw_file, t), "preadv", nbytes
        )
        in_place.note = f"manifest {manifest_size / MiB:.1f} MiB"
        _rm(raw_dir)
        _rm(pit_dir)
        if not self.args.no_anchors:
            self.anchors(wl, arrays, raw_save, raw_read_fresh, pit_save, heavy=True)
        elif not self.args.no_tf:
            self.res.note("small: --no-anchors also skips the tf.train.Checkpoint ≥ 20x target")

    def _restores(
        self,
        wl: str,
        arrays: Sequence[np.ndarray],
        raw_dir: str,
        pit_dir: str,
        raw_read: Any,
        how: str,
        nbytes: int,
        target: tuple[str, float] | None = None,
    ) -> tuple[Row, Row]:
        """Cold restores, raw vs pitstop: in place into existing arrays, and into fresh ones.

        Returns the pitstop in-place row and the raw fresh-read row (the anchors' baseline).
        """
        state = _as_state(arrays)
        targets = _touched_like(arrays)
        raw_in, pit_in, raw_fresh, pit_fresh, pit_mmap = [], [], [], [], []
        for r in range(self.repeat):
            self.cache.evict([raw_dir])
            raw_in.append(self.timed(lambda: raw_read(raw_dir, targets), nbytes, read=True))
            if r == 0:
                assert all(np.array_equal(a, b) for a, b in zip(arrays, targets, strict=True)), "raw read"
                for t in targets:
                    t.fill(0)
            self.cache.evict([pit_dir])
            mgr = pitstop.CheckpointManager(pit_dir, async_save=False)
            tstate = _as_state(targets)
            pit_in.append(self.timed(lambda m=mgr, s=tstate: m.restore(s), nbytes, read=True))
            if r == 0:
                assert all(np.array_equal(a, b) for a, b in zip(arrays, targets, strict=True)), "pitstop restore"
            mgr.close()
            self.cache.evict([raw_dir])
            fresh = [np.empty_like(a) for a in arrays]  # allocated, not touched: the read touches it
            raw_fresh.append(self.timed(lambda f=fresh: raw_read(raw_dir, f), 2 * nbytes, read=True))
            del fresh
            _free()
            self.cache.evict([pit_dir])
            mgr = pitstop.CheckpointManager(pit_dir, async_save=False)
            out: list[Any] = []
            pit_fresh.append(self.timed(lambda m=mgr, o=out: o.append(m.restore()), 2 * nbytes, read=True))
            if r == 0:
                got = out[0][1]
                assert all(np.array_equal(got[k], v) for k, v in state.items()), "pitstop restore(None)"
            mgr.close()
            del out
            _free()
            self.cache.evict([pit_dir])
            mgr = pitstop.CheckpointManager(pit_dir, async_save=False)
            out = []
            pit_mmap.append(self.timed(lambda m=mgr, o=out: o.append(m.restore(mmap=True)), nbytes, read=True))
            if r == 0:
                got = out[0][1]
                assert all(np.array_equal(got[k], v) for k, v in state.items()), "pitstop restore(mmap=True)"
                del got  # a live mapping would keep its pages in the cache through later evictions
            mgr.close()
            del out
            _free()
        raw_row = self.res.add(Row(wl, f"raw: {how} into existing arrays (cold)", raw_in, nbytes))
        in_place = self.res.add(Row(wl, "pitstop restore in place (cold)", pit_in, nbytes))
        self.res.compare(in_place, raw_row, label="raw", target=target)
        raw_read_fresh = self.res.add(Row(wl, f"raw: {how} into fresh np.empty arrays (cold)", raw_fresh, nbytes))
        row = self.res.add(Row(wl, "pitstop restore(state=None) (cold)", pit_fresh, nbytes))
        self.res.compare(row, raw_read_fresh, label="raw fresh")
        row = self.res.add(Row(wl, "pitstop restore(mmap=True) (cold, checksums verified)", pit_mmap, nbytes))
        self.res.compare(row, raw_read_fresh, label="raw fresh")
        row.note = "read-only views of the mapped files"
        return in_place, raw_read_fresh

    def async_(self) -> None:
        cfg, wl = self.cfg, "async"
        n = cfg.big_arrays
        arrays = _random_arrays(n, cfg.big_bytes // n, seed=3)
        nbytes = sum(a.nbytes for a in arrays)
        state = _as_state(arrays)
        print(f"async: {nbytes / GiB:.3f} GiB in {n} float32 arrays", flush=True)
        bufs = _touched_like(arrays)
        copies = []
        rep = max(self.repeat, 5)  # cheap, and memory-bandwidth bound: noisy on a shared 2-core VM
        d = self.path("pitstop-async")
        mgr, _ = self.manager(d, async_save=True, max_to_keep=3)
        first = self.timed(lambda: mgr.save(1, state), 2 * nbytes)
        t0 = time.perf_counter()
        mgr.wait_until_finished()
        bg_first = time.perf_counter() - t0 + first
        blocks, backgrounds = [], []
        for k in range(rep):
            for a in arrays:  # training changes the state between saves (untimed)
                a[:1] += 1.0
            self.settle(nbytes)
            # the baseline right before each save, in the same conditions
            copies.append(self.timed(lambda: [np.copyto(b, a) for a, b in zip(arrays, bufs, strict=True)], 0))
            t0 = time.perf_counter()
            mgr.save(k + 2, state)
            t1 = time.perf_counter()
            mgr.wait_until_finished()
            t2 = time.perf_counter()
            blocks.append(t1 - t0)
            backgrounds.append(t2 - t0)
        mgr.close()
        _rm(d)
        copy = self.res.add(Row(wl, "np.copyto into preallocated buffers", copies, nbytes))
        row = self.res.add(Row(wl, "pitstop async save() blocks (2nd+ saves)", blocks, nbytes))
        self.res.compare(row, copy, label="copyto", target=("<=", 1.5))
        row = self.res.add(Row(wl, "pitstop async: until committed (2nd+ saves)", backgrounds, nbytes))
        row.note = "wait_until_finished after save()"
        row = self.res.add(Row(wl, "pitstop async save() blocks (1st save)", [first], nbytes))
        self.res.compare(row, copy, label="copyto")
        row.note = f"allocates the snapshot buffers; committed after {bg_first:.2f} s"

    def incremental(self) -> None:
        cfg, wl = self.cfg, "incremental"
        n, k = cfg.big_arrays, cfg.changed_arrays
        arrays = _random_arrays(n, cfg.big_bytes // n, seed=4)
        nbytes = sum(a.nbytes for a in arrays)
        state = _as_state(arrays)
        changed = sum(a.nbytes for a in arrays[:k]) / nbytes
        print(f"incremental: {nbytes / GiB:.3f} GiB in {n} arrays; {k} changed ({changed:.1%})", flush=True)
        firsts, seconds, fracs, written = [], [], [], []
        for r in range(self.repeat):
            d = self.path("pitstop-incr")
            mgr, _ = self.manager(d)
            firsts.append(self.timed(lambda m=mgr: m.save(1, state), nbytes))
            b1 = mgr.last_save_stats.bytes_written if mgr.last_save_stats else 0
            for a in arrays[:k]:  # every byte of these arrays changes
                a += 1.0 + r
            seconds.append(self.timed(lambda m=mgr: m.save(2, state), nbytes))
            b2 = mgr.last_save_stats.bytes_written if mgr.last_save_stats else 0
            fracs.append(b2 / b1 if b1 else float("nan"))
            written.append((b1, b2))
            mgr.close()
            _rm(d)
        first = self.res.add(Row(wl, "pitstop 1st save (everything new)", firsts, nbytes))
        row = self.res.add(
            Row(wl, f"pitstop 2nd save ({k}/{n} arrays changed, {changed:.1%} of bytes)", seconds, nbytes)
        )
        self.res.compare(row, first, label="1st save")
        b1, b2 = written[-1]
        row = self.res.add(
            Row(wl, "bytes written: 2nd save / 1st save", [], value=f"{b2 / MiB:.0f} / {b1 / MiB:.0f} MiB")
        )
        row.ratio, row.vs, row.target = statistics.median(fracs), "1st", ("<=", 0.12)

    def keras(self) -> None:
        wl = "keras"
        if self.args.no_tf:
            self.res.note("keras workload skipped (--no-tf)")
            return
        tf = self.tf()
        if tf is None:
            self.res.note("keras workload skipped: TensorFlow unavailable")
            return
        keras = importlib.import_module("keras")
        cfg = self.cfg
        layers = [keras.Input((cfg.keras_input,))]
        layers += [keras.layers.Dense(h, activation="relu") for h in cfg.keras_hidden]
        layers += [keras.layers.Dense(10)]
        model = keras.Sequential(layers)
        optimizer = keras.optimizers.Adam(1e-3)
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        rng = np.random.default_rng(5)
        x = rng.random((64, cfg.keras_input), dtype=np.float32)
        y = rng.integers(0, 10, 64)
        model.train_on_batch(x, y)
        params = model.count_params()
        nbytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.variables + optimizer.variables)
        print(
            f"keras: Dense {cfg.keras_input}->{'->'.join(map(str, cfg.keras_hidden))}->10, {params / 1e6:.2f}M "
            f"parameters, Adam after one step; {len(model.variables)} + {len(optimizer.variables)} variables, "
            f"{nbytes / MiB:.0f} MiB",
            flush=True,
        )
        self.res.note(
            "keras: the main pitstop case does not use a framework adapter: it converts the variables "
            "to NumPy itself ([v.numpy() for v in ...], inside the timing) and saves "
            '{"model": [...], "opt": [...]}'
        )
        # pitstop.tensorflow (the adapter) is being written in parallel: time it when it works
        adapter_error = None
        try:
            importlib.import_module("pitstop.tensorflow")
            d = self.path("pitstop-keras-adapter-check")
            with pitstop.CheckpointManager(d, async_save=False) as mgr:
                mgr.save(1, {"model": model, "optimizer": optimizer})
            _rm(d)
        except Exception as exc:  # not there yet, or not working yet: report, don't fail
            adapter_error = f"{type(exc).__name__}: {str(exc)[:200]}"
            self.res.note(f"keras: pitstop.tensorflow adapter case skipped ({adapter_error})")

        def pit_state() -> dict[str, Any]:
            return {"model": [v.numpy() for v in model.variables], "opt": [v.numpy() for v in optimizer.variables]}

        pit, convert, tfw, h5, pit_async, adapter = [], [], [], [], [], []
        for _ in range(max(self.repeat, 5)):  # ~0.1 s disk writes compared by their medians: more runs
            if adapter_error is None:
                d = self.path("pitstop-keras-adapter")
                mgr, _ = self.manager(d)
                tree = {"model": model, "optimizer": optimizer}
                adapter.append(self.timed(lambda m=mgr, t=tree: m.save(1, t), nbytes))
                mgr.close()
                _rm(d)
            d = self.path("pitstop-keras")
            mgr, _ = self.manager(d)
            pit.append(self.timed(lambda m=mgr: m.save(1, pit_state()), nbytes))
            mgr.close()
            _rm(d)
            convert.append(self.timed(pit_state, nbytes))
            d = self.path("pitstop-keras-async")
            mgr, _ = self.manager(d, async_save=True)
            mgr.save(1, pit_state())  # first async save allocates its buffers
            mgr.wait_until_finished()
            model.train_on_batch(x, y)  # new values: nothing to deduplicate
            pit_async.append(self.timed(lambda m=mgr: m.save(2, pit_state()), nbytes))
            mgr.close()
            _rm(d)

            d = self.path("tfckpt-keras")
            os.makedirs(d)
            ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer)
            prefix = os.path.join(d, "ckpt")
            tfw.append(self.timed(lambda c=ckpt, p=prefix, d=d: (c.write(p), _fsync_files([d])), nbytes))
            _rm(d)
            p = self.path("model.weights.h5")
            h5.append(self.timed(lambda p=p: (model.save_weights(p), _fsync_files([p])), nbytes))
            _rm(p)
        pit_row = self.res.add(Row(wl, "pitstop save (sync, durable, incl. .numpy())", pit, nbytes))
        row = self.res.add(Row(wl, "  of which .numpy() conversion", convert, nbytes))
        row = self.res.add(Row(wl, "tf.train.Checkpoint(model, optimizer).write + fsync", tfw, nbytes))
        self.res.compare(row, pit_row, label="pitstop", target=(">=", 1.0))
        row.note = "target: pitstop faster"
        wbytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.variables)
        row = self.res.add(Row(wl, "model.save_weights(.weights.h5) + fsync", h5, wbytes))
        self.res.compare(row, pit_row, label="pitstop", target=(">=", 1.0))
        row.note = "model weights only (no optimizer state); target: pitstop faster"
        row = self.res.add(Row(wl, "pitstop async save() blocks (incl. .numpy())", pit_async, nbytes))
        self.res.compare(row, pit_row, label="pitstop sync")
        if adapter:
            row = self.res.add(Row(wl, "pitstop save via pitstop.tensorflow adapter (sync)", adapter, nbytes))
            self.res.compare(row, pit_row, label="pitstop .numpy()")
            row.note = 'state {"model": model, "optimizer": optimizer}'
        try:
            importlib.import_module("torch")
        except ImportError:
            self.res.note("keras: torch is not installed, so there is no torch.save case")

    def scaling(self) -> None:
        cfg, wl = self.cfg, "scaling"
        print("scaling: save time against total bytes, and per-array overhead", flush=True)
        # Each size is measured against the raw disk at the same size, interleaved, so that
        # the disk's own curve (it is not linear at small sizes either) is in the same table.
        sizes: list[tuple[int, Row, Row]] = []
        for total in cfg.scaling_bytes:
            count = max(1, total // cfg.scaling_array_bytes)
            arrays = _random_arrays(count, cfg.scaling_array_bytes, seed=6)
            state = _as_state(arrays)
            nb = sum(a.nbytes for a in arrays)
            # a ratio of two medians of disk writes needs more runs; small sizes are cheap
            reps = self.repeat if self.args.quick else max(self.repeat, 5) * (3 if nb <= 256 * MiB else 1)
            pit_runs: list[float] = []
            raw_runs: list[float] = []

            def raw_once(a: Sequence[np.ndarray] = arrays, nb: int = nb, runs: list[float] = raw_runs) -> None:
                raw_dir = self.path("raw-scale")
                os.makedirs(raw_dir)
                runs.append(self.timed(lambda: raw_write_files(raw_dir, a), nb))
                _rm(raw_dir)

            def pit_once(s: dict[str, Any] = state, nb: int = nb, runs: list[float] = pit_runs) -> None:
                d = self.path("pitstop-scale")
                mgr, _ = self.manager(d)
                runs.append(self.timed(lambda: mgr.save(1, s), nb))
                mgr.close()
                _rm(d)

            for rep in range(reps):  # alternating which goes first: no order bias
                for once in (raw_once, pit_once) if rep % 2 == 0 else (pit_once, raw_once):
                    once()
            label = f"{_fmt_bytes(nb)} ({count} x {_fmt_bytes(cfg.scaling_array_bytes)})"
            raw = self.res.add(Row(wl, f"raw: per-array write + fsync, {label}", raw_runs, nb))
            pit = self.res.add(Row(wl, f"pitstop save {label}", pit_runs, nb))
            sizes.append((nb, pit, raw))
        nb_max, biggest, raw_biggest = sizes[-1]
        for nb, pit, raw in sizes:
            if pit.median is None or raw.median is None or biggest.median is None or raw_biggest.median is None:
                continue
            pit_per_byte = (pit.median / nb) / (biggest.median / nb_max)
            raw_per_byte = (raw.median / nb) / (raw_biggest.median / nb_max)
            raw.note = f"disk s/byte {raw_per_byte:.2f}x its s/byte at {_fmt_bytes(nb_max)}"
            if nb == nb_max:
                pit.note = f"reference for linearity; {pit.median / raw.median:.2f}x the raw disk"
                continue
            pit.ratio, pit.vs = pit_per_byte, f"s/byte of {_fmt_bytes(nb_max)}"
            pit.target = ("<=", 1.3)
            pit.note = f"{pit.median / raw.median:.2f}x the raw disk at this size"
        fit = _affine_fit([(nb, pit.median) for nb, pit, _ in sizes if pit.median is not None])
        if fit is not None:
            fixed, per_byte = fit
            self.res.note(
                f"scaling: least-squares fit of pitstop save time = {fixed * 1e3:.1f} ms + bytes / "
                f"{(1 / per_byte if per_byte > 0 else float('inf')) / 1e9:.2f} GB/s"
            )

        by_count: list[tuple[int, Row]] = []
        for count in cfg.scaling_counts:
            arrays = _random_arrays(count, cfg.tiny_bytes, seed=7)
            state = _as_state(arrays)
            nb = sum(a.nbytes for a in arrays)
            runs = []
            for _ in range(self.repeat):
                d = self.path("pitstop-count")
                mgr, _ = self.manager(d)
                runs.append(self.timed(lambda m=mgr, s=state: m.save(1, s), nb))
                mgr.close()
                _rm(d)
            row = self.res.add(Row(wl, f"pitstop save {count:,} x {_fmt_bytes(cfg.tiny_bytes)} arrays", runs, nb))
            by_count.append((count, row))
        c0, r0 = by_count[0]
        margins: dict[int, float] = {}
        for count, row in by_count:
            assert row.median is not None
            per = row.median / count * 1e6
            if count == c0 or r0.median is None:
                row.note = f"{per:.1f} µs/array (total / count; fixed costs dominate)"
                continue
            margins[count] = (row.median - r0.median) / (count - c0) * 1e6
            row.note = f"{per:.1f} µs/array; marginal {margins[count]:.1f} µs/array over {c0}"
        ref = min(margins) if margins else None
        for count, row in by_count:
            if ref is not None and count in margins and count != ref and margins[ref] > 0:
                row.ratio, row.vs = margins[count] / margins[ref], f"marginal µs/array at {ref:,}"
                row.target = ("<=", 2.0)

    def compression(self) -> None:
        """zstd on compressible data (token ids, masks) and on random floats (where it must
        stay out of the way): time and bytes against the uncompressed save, and the restore."""
        cfg, wl = self.cfg, "compression"
        rng = np.random.default_rng(8)
        n = 16
        each = cfg.compression_bytes // n
        datasets = {
            "compressible (int32 ids < 1000, bool masks)": [
                (rng.integers(0, 1000, each // 4, dtype=np.int32) if i % 2 else rng.random(each) < 0.1)
                for i in range(n)
            ],
            "random float32": _random_arrays(n, each, seed=9),
        }
        for label, arrays in datasets.items():
            nbytes = sum(a.nbytes for a in arrays)
            state = _as_state(arrays)
            print(f"compression: {label}, {nbytes / MiB:.0f} MiB in {n} arrays", flush=True)
            plain, zipped, restores = [], [], []
            sizes: dict[str, int] = {}
            for _ in range(self.repeat):
                for codec, runs in (("none", plain), ("zstd", zipped)):
                    d = self.path(f"pitstop-{codec}")
                    mgr, _ = self.manager(d, compression="zstd" if codec == "zstd" else None)
                    runs.append(self.timed(lambda m=mgr, s=state: m.save(1, s), nbytes))
                    sizes[codec] = mgr.last_save_stats.bytes_written if mgr.last_save_stats else 0
                    mgr.close()
                    if codec == "zstd":
                        self.cache.evict([d])
                        targets = _touched_like(arrays)
                        tstate = _as_state(targets)
                        m2 = pitstop.CheckpointManager(d, async_save=False)
                        restores.append(self.timed(lambda m=m2, t=tstate: m.restore(t), nbytes, read=True))
                        m2.close()
                        assert all(np.array_equal(a, b) for a, b in zip(arrays, targets, strict=True)), "zstd restore"
                        del targets, tstate
                    _rm(d)
            base = self.res.add(Row(wl, f"{label}: pitstop save, uncompressed", plain, nbytes))
            row = self.res.add(Row(wl, f"{label}: pitstop save, compression='zstd'", zipped, nbytes))
            self.res.compare(row, base, label="uncompressed")
            row.note = f"{sizes['zstd'] / MiB:.1f} MiB written ({sizes['zstd'] / max(1, sizes['none']):.1%})"
            self.res.add(Row(wl, f"{label}: restore in place of the zstd save (cold)", restores, nbytes))


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


# ----------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small sizes, 1 repeat: a smoke run of a few seconds")
    p.add_argument("--only", default="", help=f"comma-separated workloads to run (of {','.join(WORKLOADS)})")
    p.add_argument(
        "--repeat", type=int, default=None, help="runs per case, the median is reported (default 3; 1 with --quick)"
    )
    p.add_argument("--markdown", metavar="PATH", help="also write the header and results table as Markdown")
    p.add_argument("--dir", default=None, help="where the scratch directory is created (default: the system temp dir)")
    p.add_argument("--no-anchors", action="store_true", help="skip the other libraries on big/small")
    p.add_argument(
        "--settle",
        type=float,
        default=None,
        help="seconds per GiB to pause before each measurement so the host absorbs the previous write "
        "(default 3; 0 with --quick)",
    )
    p.add_argument(
        "--no-prefault",
        action="store_true",
        help="do not first-touch the memory a measurement will use (shows the VM's host page-fault noise)",
    )
    p.add_argument("--no-tf", action="store_true", help="never import TensorFlow (skips its anchors and keras)")
    args = p.parse_args(argv)
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = [w for w in only if w not in WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    args.workloads = only or list(WORKLOADS)
    if args.repeat is not None and args.repeat < 1:
        p.error("--repeat must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = Config.quick(args.repeat) if args.quick else Config(repeat=args.repeat or 3)
    cfg.heavy_repeat = min(cfg.heavy_repeat, cfg.repeat)
    args.repeat_effective, args.heavy_effective = cfg.repeat, cfg.heavy_repeat
    args.settle_effective = args.settle if args.settle is not None else (0.0 if args.quick else 3.0)
    parent = args.dir or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="pitstop-bench-", dir=parent)
    t_start = time.perf_counter()
    try:
        bench = Bench(args, cfg, scratch)
        header = header_lines(args, scratch, bench.cache.method)
        print("pitstop benchmarks")
        for line in header:
            print(f"  {line}")
        print(flush=True)
        for w in args.workloads:
            t0 = time.perf_counter()
            getattr(bench, "async_" if w == "async" else w)()
            _free()  # the workload's arrays die with its frame
            print(f"  ({w} took {time.perf_counter() - t0:.0f} s)\n", flush=True)
        res = bench.res
        if bench.cache.residency:
            worst = max(bench.cache.residency)
            res.note(
                f"cold reads: after eviction at most {worst:.1%} of the files' pages were still in the page cache "
                f"(mincore, {len(bench.cache.residency)} evictions); the VM host may still cache the disk"
            )
        elapsed = time.perf_counter() - t_start
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        footer = f"total time {elapsed:.0f} s; load average at end: {load}"
        print("\n" + "=" * 100)
        print("pitstop benchmarks: results")
        for line in header:
            print(f"  {line}")
        print(f"  {footer}\n")
        print(text_table(res.rows))
        if res.notes:
            print("\nnotes:")
            for n in res.notes:
                print(f"  - {n}")
        missed = [r for r in res.rows if r.ok is False]
        print(f"\ntargets: {sum(r.ok is True for r in res.rows)} met, {len(missed)} missed")
        for r in missed:
            print(f"  MISS {r.workload}: {r.case}: {_fmt_ratio(r)} (target {_fmt_target(r)})")
        if args.markdown:
            md = ["## Benchmarks", ""]
            md += [f"- {line}" for line in [*header, footer]]
            md += ["", markdown_table(res.rows), ""]
            if res.notes:
                md += ["Notes:", ""] + [f"- {n}" for n in res.notes] + [""]
            with open(args.markdown, "w") as f:
                f.write("\n".join(md))
            print(f"\nwrote {args.markdown}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
