"""PDF pages loaded and rendered by pdfium in a child process, so that one hostile page costs that page only.

The child (`python -m qwenvl_cli.media.sandbox`) runs under an address-space limit (RLIMIT_AS) and the parent
gives each page a wall-clock deadline; past it, on Ctrl-C, or when the child dies, the child is killed and
the next page starts a new one. One child serves every page of every document until then, so a normal PDF
pays one process start (~0.15 s) per run, not per page. pdfium renders straight into a shared-memory buffer
(a memfd on Linux) that the parent copies the RGB rows out of once; requests and replies are small JSON.
The child imports only pypdfium2 and the standard library.
"""

from __future__ import annotations

import atexit
import json
import mmap
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_HEADER = struct.Struct("<QQ")  # (JSON bytes, raw bytes) that follow
MAX_MESSAGE_BYTES = 1 << 20  # a JSON request or reply; anything longer is a broken peer
MAX_SAID_BYTES = 4096  # what the child passes on of what pdfium wrote to its fd 2, per request


class RenderLimitError(Exception):
    """The child ran past the deadline, or died (out of memory under RLIMIT_AS, or crashed)."""


class RenderError(Exception):
    """pdfium refused (a page it cannot load or render): the child is fine and goes on."""


# ---------------------------------------------------------------------------------------------- framing
def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def _read_into(fd: int, view: memoryview, deadline: float | None) -> None:
    """Fill `view` from `fd`, waiting at most until `deadline` (time.monotonic()); EOFError when it closes."""
    while view:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        n = os.readv(fd, [view])
        if n == 0:
            raise EOFError
        view = view[n:]


def _send(fd: int, message: dict, raw=b"") -> None:
    body = json.dumps(message).encode()
    raw_len = memoryview(raw).nbytes
    _write_all(fd, _HEADER.pack(len(body), raw_len) + body)
    if raw_len:
        _write_all(fd, raw)


def _receive(fd: int, deadline: float | None, max_raw: int) -> tuple[dict, bytearray]:
    header = bytearray(_HEADER.size)
    _read_into(fd, memoryview(header), deadline)
    body_len, raw_len = _HEADER.unpack(header)
    if body_len > MAX_MESSAGE_BYTES or raw_len > max_raw:
        raise ValueError(f"message of {body_len} + {raw_len} bytes, over the limits {MAX_MESSAGE_BYTES} + {max_raw}")
    body = bytearray(body_len)
    _read_into(fd, memoryview(body), deadline)
    raw = bytearray(raw_len)  # calloc'd: its pages are only touched as the bitmap arrives
    _read_into(fd, memoryview(raw), deadline)
    return json.loads(body), raw


# ---------------------------------------------------------------------------------------------- parent side
@dataclass(frozen=True)
class PageInfo:
    size: tuple[float, float]  # points, as displayed (after /Rotate, crop box clipped)
    rotation: int
    bbox: tuple[float, float, float, float]


@dataclass(frozen=True)
class Bitmap:
    width: int
    height: int
    stride: int  # bytes per row, >= 3 * width
    rgb: memoryview  # height * stride bytes, R, G, B per pixel: a view of the shared buffer, valid until the
    # next request (copy it out, then release it)


def _page_buffer() -> int:
    """The fd of an empty file in memory that the child renders into and the parent reads from."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("qwenvl-page", os.MFD_CLOEXEC)
    with tempfile.TemporaryFile() as f:  # elsewhere: an unlinked temporary file
        return os.dup(f.fileno())


class Renderer:
    """The parent's end of one child at a time. Not thread-safe beyond its lock: one request at a time."""

    def __init__(self, memory_bytes: int):
        self.memory_bytes = memory_bytes
        self.generation = 0  # counts children started; documents are open in the current one only
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        # Shared with every child. It only grows (to the largest bitmap rendered, at most 3 bytes x
        # MAX_RENDER_PIXELS = 150 MB): a mapping past a shrunk end would fault (SIGBUS) on the next page.
        self._buffer_fd: int | None = None
        self._mapping: mmap.mmap | None = None  # the parent's read-only view of it

    def _start(self) -> subprocess.Popen:
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        debug = os.environ.get("QWENVL_DEBUG") == "1"
        if self._buffer_fd is None:
            self._buffer_fd = _page_buffer()
        proc = subprocess.Popen(
            [sys.executable, "-m", "qwenvl_cli.media.sandbox", str(self.memory_bytes), str(self._buffer_fd)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if debug else subprocess.DEVNULL,  # the child captures its own fd 2 once started
            env=env,
            pass_fds=(self._buffer_fd,),
            start_new_session=False,  # a terminal's Ctrl-C reaches it too; it ignores SIGINT, the parent kills it
        )
        self.generation += 1
        return proc

    def view(self, size: int) -> memoryview:
        """The first `size` bytes of the shared buffer, as the child left them."""
        if self._mapping is None or len(self._mapping) < size:
            self._mapping = None  # the old one closes when the last view of it is released
            length = os.fstat(self._buffer_fd).st_size
            if length < size:
                raise RenderLimitError(f"the renderer left {length} bytes for a bitmap of {size}")
            self._mapping = mmap.mmap(self._buffer_fd, length, prot=mmap.PROT_READ)
        return memoryview(self._mapping)[:size]

    def close(self) -> None:
        """Stop the child and free the shared buffer."""
        self.kill()
        self._mapping = None
        if self._buffer_fd is not None:
            os.close(self._buffer_fd)
            self._buffer_fd = None

    @property
    def running(self) -> bool:
        return self._proc is not None

    def kill(self) -> int | None:
        """Stop the child now (if any); its exit status (negative: the signal that ended it)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        for pipe in (proc.stdin, proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        return proc.wait()

    def request(self, message: dict, deadline: float, raw=b"") -> dict:
        """Send one request and wait for its reply until `deadline`. RenderLimitError when the child runs
        past it or dies (it is killed, and the next request starts a new one); RenderError for pdfium's own
        refusals. Any interruption (Ctrl-C) kills the child before it propagates."""
        with self._lock:
            if self._proc is None:
                self._proc = self._start()
            proc = self._proc
            try:
                _send(proc.stdin.fileno(), message, raw)
                reply, _ = _receive(proc.stdout.fileno(), deadline, max_raw=0)
            except TimeoutError as exc:
                self.kill()
                raise RenderLimitError("still rendering at the deadline") from exc
            except (EOFError, BrokenPipeError, ConnectionError, ValueError) as exc:
                status = self.kill()
                raise RenderLimitError(_death(status)) from exc
            except BaseException:
                self.kill()  # KeyboardInterrupt mid-render: pdfium in the child cannot be interrupted otherwise
                raise
        if "error" in reply:
            if reply.get("fatal"):
                self.kill()  # MemoryError in the child: it may be in no state to go on
                raise RenderLimitError(f"the renderer ran out of memory: {reply['error']}")
            raise RenderError(reply["error"])
        return reply

    def post(self, message: dict) -> None:
        """A request without a reply (closing a document); nothing happens when no child runs."""
        with self._lock:
            if self._proc is not None:
                try:
                    _send(self._proc.stdin.fileno(), message)
                except OSError:
                    self.kill()


def _death(status: int | None) -> str:
    if status is not None and status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"the renderer ran out of memory or crashed: {name}"
    return f"the renderer exited unexpectedly, status {status}"


_shared: Renderer | None = None  # the one child of this process, shared by every PdfFile


def shared_renderer(memory_bytes: int) -> Renderer:
    """The process's renderer, restarted when asked for another memory limit (tests use small ones)."""
    global _shared
    if _shared is None or _shared.memory_bytes != memory_bytes:
        if _shared is not None:
            _shared.close()
        _shared = Renderer(memory_bytes)
    return _shared


@atexit.register
def _stop_shared() -> None:
    if _shared is not None:
        _shared.kill()


class RemoteDocument:
    """A document as the child sees it: opened there on first use, again after the child was replaced."""

    _next_key = 0

    def __init__(self, source: Path | bytes, password: str | None, renderer: Renderer):
        RemoteDocument._next_key += 1
        self.key = RemoteDocument._next_key
        self._source = source
        self._password = password
        self._renderer = renderer
        self._generation = 0  # the child generation it is open in; 0: none

    def _ensure_open(self, deadline: float) -> None:
        if self._generation == self._renderer.generation and self._renderer.running:
            return
        message = {"op": "open", "doc": self.key, "password": self._password}
        raw = b""
        if isinstance(self._source, bytes):
            raw = self._source
        else:
            message["path"] = os.fsdecode(self._source)
        self._renderer.request(message, deadline, raw=raw)
        self._generation = self._renderer.generation

    def page(self, index: int, deadline: float) -> tuple[PageInfo, str]:
        """Load page `index` (0-based) in the child; it stays loaded for render(). Also what pdfium said."""
        self._ensure_open(deadline)
        reply = self._renderer.request({"op": "page", "doc": self.key, "index": index}, deadline)
        info = PageInfo(tuple(reply["size"]), int(reply["rotation"]), tuple(reply["bbox"]))
        return info, reply.get("said", "")

    def render(self, scale: float, max_pixels: int, deadline: float) -> tuple[Bitmap, str]:
        """The loaded page at `scale` pixels per point, on white, annotations and form fields drawn."""
        reply = self._renderer.request({"op": "render", "scale": scale}, deadline)
        width, height, stride = int(reply["width"]), int(reply["height"]), int(reply["stride"])
        if not (0 < width * height <= max_pixels and 3 * width <= stride <= 3 * width + 3):
            self._renderer.kill()
            raise RenderLimitError(f"the renderer made a {width}x{height} bitmap (stride {stride})")
        return Bitmap(width, height, stride, self._renderer.view(stride * height)), reply.get("said", "")

    def close(self) -> None:
        if self._generation == self._renderer.generation:
            self._renderer.post({"op": "close", "doc": self.key})
        self._generation = 0


# ---------------------------------------------------------------------------------------------- child side
def _limit_memory(memory_bytes: int) -> None:
    import resource

    try:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            memory_bytes = min(memory_bytes, hard)
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, hard))
    except (ValueError, OSError):
        pass  # a platform without RLIMIT_AS (macOS ignores it): the deadline still holds


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no orphan keeps rendering
    except (OSError, AttributeError):
        pass


class _SharedBitmaps:
    """The child's end of the page buffer: pdfium's bitmaps are made in it (PdfPage.render's bitmap_maker)."""

    def __init__(self, fd: int):
        self._fd = fd
        self._mapping: mmap.mmap | None = None

    def make(self, width: int, height: int, format: int, rev_byteorder: bool = False):
        import ctypes

        import pypdfium2 as pdfium

        stride = 3 * width  # packed RGB: the parent checks the format through the stride
        size = stride * height
        if self._mapping is None or len(self._mapping) < size:
            self._mapping = None  # the old one closes with the last bitmap made in it
            if os.fstat(self._fd).st_size < size:
                os.ftruncate(self._fd, size)
            self._mapping = mmap.mmap(self._fd, size)
        buffer = (ctypes.c_ubyte * size).from_buffer(self._mapping)
        return pdfium.PdfBitmap.new_native(width, height, format, rev_byteorder, buffer=buffer, stride=stride)


def _serve(memory_bytes: int, buffer_fd: int) -> None:
    import logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; a traceback here would reach the terminal
    _die_with_parent()
    requests, replies = os.dup(0), os.dup(1)
    said_sink = tempfile.TemporaryFile()  # fd 1 and fd 2: pdfium's prints must not corrupt the replies
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(said_sink.fileno(), 1)
    os.dup2(said_sink.fileno(), 2)
    logging.getLogger("pypdfium2").setLevel(logging.CRITICAL)  # the parent reports open-time warnings itself
    _limit_memory(memory_bytes)

    import pypdfium2 as pdfium

    docs: dict[int, pdfium.PdfDocument] = {}
    page = None
    bitmaps = _SharedBitmaps(buffer_fd)

    def said() -> str:
        size = os.fstat(said_sink.fileno()).st_size
        if not size:
            return ""
        os.lseek(said_sink.fileno(), 0, os.SEEK_SET)
        text = os.read(said_sink.fileno(), MAX_SAID_BYTES).decode("utf-8", "replace")
        os.ftruncate(said_sink.fileno(), 0)
        os.lseek(said_sink.fileno(), 0, os.SEEK_SET)
        return text

    while True:
        try:
            message, raw = _receive(requests, None, max_raw=1 << 40)
        except EOFError:
            return  # the parent closed the pipe (or died)
        op = message["op"]
        try:
            if op == "open":
                source = message.get("path") or bytes(raw)
                del raw
                doc = pdfium.PdfDocument(source, password=message.get("password") or None)
                doc.init_forms()
                docs[message["doc"]] = doc
                _send(replies, {"pages": len(doc), "said": said()})
            elif op == "page":
                if page is not None:
                    page.close()
                    page = None
                page = docs[message["doc"]][message["index"]]
                size = page.get_size()
                _send(replies, {"size": list(size), "rotation": page.get_rotation(),
                                "bbox": [float(v) for v in page.get_bbox()], "said": said()})
            elif op == "render":
                bitmap = page.render(
                    scale=message["scale"], may_draw_forms=True, fill_color=(255, 255, 255, 255),
                    rev_byteorder=True,  # RGB bytes: the parent copies them once, unswapped
                    force_bitmap_format=pdfium.raw.FPDFBitmap_BGR, bitmap_maker=bitmaps.make,
                )
                try:
                    reply = {"width": bitmap.width, "height": bitmap.height, "stride": bitmap.stride, "said": said()}
                finally:
                    bitmap.close()
                    del bitmap  # releases the ctypes view of the shared buffer
                    page.close()
                    page = None
                _send(replies, reply)
            elif op == "close":
                if page is not None:
                    page.close()
                    page = None
                doc = docs.pop(message["doc"], None)
                if doc is not None:
                    doc.close()
        except MemoryError as exc:
            _send(replies, {"error": f"MemoryError: {exc}", "fatal": True})
        except Exception as exc:  # noqa: BLE001 - pdfium's refusals and anything else: one reply, go on
            if op != "close":
                _send(replies, {"error": " ".join(str(exc).split()) or type(exc).__name__, "said": said()})


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
