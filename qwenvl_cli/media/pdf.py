"""PDF pages as RGB images, rendered lazily with pdfium (pypdfium2), one page at a time.

Owns `--pages` parsing, the render resolution (DEFAULT_DPI, lowered for giant pages so a bitmap never
exceeds MAX_RENDER_PIXELS), the bounds on one page's render (RENDER_SECONDS, RENDER_MEMORY_BYTES: pages are
loaded and rendered in a child process, media/sandbox.py) and the map from pixels on a rendered page back to
PDF user space, so that boxes the model finds can be reported in points as PDF viewers and annotations use them.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from qwenvl_cli.errors import InputError, UsageError
from qwenvl_cli.media.capture import Said, captured_output
from qwenvl_cli.media.detect import read_head

if TYPE_CHECKING:  # imported where a PDF is opened: 20-30 ms that an image-only run does not pay
    import pypdfium2 as pdfium

    from qwenvl_cli.media import sandbox

# 200 dpi: an A4 page (595.28x841.89 pt) becomes 1654x2339 px = 3.9 MP, under the checkpoints' default
# max_pixels (12,845,056), so the processor does not downscale it; 8-pt print is ~22 px tall, legible to
# the model. smart_resize makes that 2352x1652 px = 84x59 merged patches = 4,956 vision tokens per page.
DEFAULT_DPI = 200
# A 200-inch (14,400 pt) page at 200 dpi would be a 1.6-gigapixel bitmap; past this many pixels the page
# is rendered at the highest dpi that fits instead (50 MP of RGB = 150 MB).
MAX_RENDER_PIXELS = 50_000_000
POINTS_PER_INCH = 72  # PDF user space unit (pdfium ignores /UserUnit)
# One page may take this long to load, render and hand over (an A4 page at 200 dpi takes ~0.1 s; a dense
# vector map a few seconds), in a child process of at most this much address space (the 150 MB bitmap,
# decoded images on the page, pdfium itself). Past either, the page is an error of that page only: a page
# whose form draws itself twice grows without bound (24 GB after two minutes) and ignores Ctrl-C in-process.
RENDER_SECONDS = 30.0
RENDER_MEMORY_BYTES = 4 << 30
# The largest PDF opened: scanned books run to a few GB. pdfium reads a file as it needs it, but scans all of
# it when the cross-reference table is broken.
MAX_PDF_BYTES = 8 << 30

_PDFIUM_ERRORS = {  # FPDF_ERR_* codes from FPDF_GetLastError
    1: "unknown error",
    2: "file access error",
    3: "data format error",
    4: "incorrect password",
    5: "unsupported security scheme",
    6: "page not found or content error",
}


def _one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _pages_text(n: int) -> str:
    return f"{n} page" if n == 1 else f"{n} pages"


def _size_text(n: int) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


# ---------------------------------------------------------------------------------------------- --pages
@dataclass(frozen=True)
class PageSpec:
    """1-based inclusive page ranges as given; an end of None runs to the last page."""

    ranges: tuple[tuple[int, int | None], ...]

    def resolve(self, page_count: int, name: str) -> list[int]:
        """Page numbers in the order given, each once. Every range must lie within the document."""
        out: dict[int, None] = {}  # ordered set
        for start, end in self.ranges:
            text = _range_text(start, end)
            if start > page_count:
                raise InputError(
                    f"{name}: --pages {text} is beyond the last page (the PDF has {_pages_text(page_count)})"
                )
            if end is not None and end > page_count:
                raise InputError(
                    f"{name}: --pages {text} goes beyond the last page (the PDF has {_pages_text(page_count)})"
                )
            out.update(dict.fromkeys(range(start, (page_count if end is None else end) + 1)))
        return list(out)


def _range_text(start: int, end: int | None) -> str:
    return f"{start}-" if end is None else str(start) if start == end else f"{start}-{end}"


def parse_pages(spec: str) -> PageSpec:
    """`--pages` text: comma-separated 1-based pages and ranges, "1-3,7", "5-" (to the end), "-3" (from
    the first). Spaces around numbers are allowed. Bad syntax is a UsageError naming the bad part."""
    hint = "use e.g. 2, 1-3,7, 5- or -3"
    if not spec.strip():
        raise UsageError(f"--pages is empty ({hint})")
    ranges: list[tuple[int, int | None]] = []
    for raw in spec.split(","):
        part = raw.strip()
        if not part:
            raise UsageError(f"--pages {spec!r}: an empty item between commas ({hint})")
        lo_text, dash, hi_text = (s.strip() for s in part.partition("-"))
        if not dash:
            lo = hi = _page_number(lo_text, part, hint)
        elif not lo_text and not hi_text:
            raise UsageError(f"--pages {spec!r}: '{part}' is not a page or a range ({hint})")
        else:
            lo = _page_number(lo_text, part, hint) if lo_text else 1
            hi = _page_number(hi_text, part, hint) if hi_text else None
        if hi is not None and hi < lo:
            raise UsageError(f"--pages {spec!r}: '{part}' runs backwards ({hint})")
        ranges.append((lo, hi))
    return PageSpec(tuple(ranges))


def _page_number(text: str, part: str, hint: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise UsageError(f"--pages: '{part}' is not a page or a range ({hint})")
    number = int(text)
    if number < 1:
        raise UsageError(f"--pages: '{part}': pages are numbered from 1")
    return number


# ---------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class PageGeometry:
    """How the pixels of a rendered page map to PDF user space (points, origin bottom-left, y up).

    The rendered region is the page's crop box (intersected with its media box, as pdfium does), turned
    clockwise by the page's /Rotate, stretched to width_px x height_px."""

    dpi: float  # the resolution actually rendered at (lower than asked for giant pages)
    width_px: int  # the rendered image, after /Rotate
    height_px: int
    rotation: int  # the page's /Rotate: 0, 90, 180 or 270, clockwise as displayed
    crop_box: tuple[float, float, float, float]  # (left, bottom, right, top) in user-space points

    def __post_init__(self):
        if self.rotation not in (0, 90, 180, 270):
            raise ValueError(f"rotation {self.rotation}: expected 0, 90, 180 or 270")
        left, bottom, right, top = self.crop_box
        if right <= left or top <= bottom or self.width_px < 1 or self.height_px < 1:
            raise ValueError(f"empty page: crop box {self.crop_box}, {self.width_px}x{self.height_px} px")

    def point_to_points(self, x: float, y: float) -> tuple[float, float]:
        """A point on the rendered image (pixels, origin top-left, y down) -> user space (x, y) in points,
        unrounded."""
        left, bottom, right, top = self.crop_box
        turned = self.rotation in (90, 270)
        across = (top - bottom) if turned else (right - left)  # points shown along the image's x axis
        down = (right - left) if turned else (top - bottom)  # points shown along the image's y axis
        u = x * across / self.width_px  # points from the image's left edge
        v = y * down / self.height_px  # points from the image's top edge
        if self.rotation == 0:
            return left + u, top - v
        if self.rotation == 90:  # the page's left edge is at the top of the image, its bottom at the left
            return left + v, bottom + u
        if self.rotation == 180:
            return right - u, bottom + v
        return right - v, top - u  # 270: the page's right edge is at the top, its top at the left

    def to_points(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """A pixel box [x1, y1, x2, y2] on the rendered image -> the same region in user-space points
        [x1, y1, x2, y2] with x1 < x2 and y1 < y2 (a PDF /Rect), rounded to 2 decimals."""
        ax, ay = self.point_to_points(box[0], box[1])
        bx, by = self.point_to_points(box[2], box[3])
        x1, y1, x2, y2 = (float(v) for v in (min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)))
        return (round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2))


@dataclass(frozen=True)
class Page:
    number: int  # 1-based
    image: Image.Image  # RGB, width_px x height_px
    geometry: PageGeometry


def render_scale(width_pt: float, height_pt: float, dpi: float) -> float:
    """The scale (pixels per point) to render a page of this size (as displayed) at `dpi` with, lowered so
    that pdfium's bitmap, ceil(width_pt * scale) x ceil(height_pt * scale), stays within MAX_RENDER_PIXELS."""
    # Just under dpi/72: 792 pt x 150/72 is 1650.0000000000002 in floating point, and ceil would add a row.
    scale = dpi / POINTS_PER_INCH * (1 - 1e-9)
    if math.ceil(width_pt * scale) * math.ceil(height_pt * scale) <= MAX_RENDER_PIXELS:
        return scale
    scale = math.sqrt(MAX_RENDER_PIXELS / (width_pt * height_pt))
    while math.ceil(width_pt * scale) * math.ceil(height_pt * scale) > MAX_RENDER_PIXELS:
        scale *= 0.999  # ceil adds up to one row and column
    return scale


# ---------------------------------------------------------------------------------------------- document
class PdfFile:
    """An open PDF. Use as a context manager (or call close()): it holds pdfium's document and, for a
    path, the file. pdfium is not thread-safe: use one PdfFile from one thread.

    Pages are loaded and rendered in the process's render child (isolated=True, the default), bounded by
    RENDER_SECONDS and RENDER_MEMORY_BYTES; this process's own document only counts pages and says why one
    cannot be opened. isolated=False renders here, unbounded (a debugging aid: pdfium under a debugger)."""

    def __init__(
        self,
        document: pdfium.PdfDocument,
        name: str,
        remote: sandbox.RemoteDocument | None = None,
        on_warning: Callable[[str], None] | None = None,
    ):
        self._doc = document
        self._remote = remote
        self._closed = False
        self._on_warning = on_warning
        self.name = name
        self.page_count: int = len(document)

    @classmethod
    def open(
        cls,
        source: Path | bytes,
        name: str,
        password: str | None = None,
        on_warning: Callable[[str], None] | None = None,
        isolated: bool = True,
    ) -> PdfFile:
        """Open a PDF file (or its bytes). Every failure is an InputError naming `name`; what pdfium says
        on the side (an XFA form it cannot run) goes to `on_warning` as one line naming `name`."""
        import pypdfium2 as pdfium

        from qwenvl_cli.media import sandbox

        if isinstance(source, bytes):
            if not source:
                raise InputError(f"{name}: empty (0 bytes)")
            size = len(source)
            data: Path | bytes = source
        else:
            data = Path(source)
            read_head(data, name)
            size = _file_size(data, name)
        if size > MAX_PDF_BYTES:
            raise InputError(f"{name}: {_size_text(size)}, over the limit of {_size_text(MAX_PDF_BYTES)} for a PDF")
        logged: list[str] = []
        try:
            with captured_output() as said, _logged(logged):
                document = pdfium.PdfDocument(data, password=password or None)
                document.init_forms()  # before any page is loaded, so that form fields get drawn
        except pdfium.PdfiumError as exc:
            if _loads_without_pages(data, password):
                raise InputError(f"{name}: the PDF has no pages") from exc
            raise InputError(_open_error(exc, name, password)) from exc
        except FileNotFoundError as exc:
            raise InputError(f"{name}: file not found") from exc
        except OSError as exc:
            raise InputError(f"{name}: cannot read ({_one_line(exc)})") from exc
        note = _open_note(name, logged, said)
        if note is not None and on_warning is not None:
            on_warning(note)
        remote = None
        if isolated:
            remote = sandbox.RemoteDocument(data, password, sandbox.shared_renderer(RENDER_MEMORY_BYTES))
        return cls(document, name, remote, on_warning)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._remote is not None:
                self._remote.close()
            self._doc.close()

    def __enter__(self) -> PdfFile:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def render(self, number: int, dpi: float = DEFAULT_DPI) -> Page:
        """Page `number` (1-based) as an RGB image on white, annotations and form fields drawn."""
        if self._closed:
            raise ValueError(f"{self.name}: the PDF is closed")
        if not 1 <= number <= self.page_count:
            raise InputError(
                f"{self.name}: page {number} does not exist (the PDF has {_pages_text(self.page_count)})"
            )
        if not dpi > 0:
            raise UsageError(f"--dpi must be positive, got {dpi}")
        if self._remote is None:
            return self._render_here(number, dpi)
        from qwenvl_cli.media import sandbox

        deadline = time.monotonic() + RENDER_SECONDS
        try:
            try:
                info, said_loading = self._remote.page(number - 1, deadline)
            except sandbox.RenderError as exc:
                raise InputError(f"{self.name}: page {number}: cannot load ({exc})") from exc
            width_pt, height_pt = info.size
            if not (width_pt > 0 and height_pt > 0):
                raise InputError(f"{self.name}: page {number} is empty ({width_pt:g}x{height_pt:g} pt)")
            scale = render_scale(width_pt, height_pt, dpi)
            try:
                bitmap, said_rendering = self._remote.render(scale, MAX_RENDER_PIXELS, deadline)
            except sandbox.RenderError as exc:
                raise InputError(f"{self.name}: page {number}: cannot render ({exc})") from exc
        except sandbox.RenderLimitError as exc:
            raise InputError(
                f"{self.name}: page {number} could not be rendered within {RENDER_SECONDS:g} s / "
                f"{_size_text(RENDER_MEMORY_BYTES)} ({exc})"
            ) from exc
        said = Said(output=said_loading + said_rendering).summary()
        if said is not None and self._on_warning is not None:
            self._on_warning(f"{self.name}: page {number}: pdfium: {said}")
        # One copy, out of the buffer shared with the child (RGB rows of `stride` bytes) into the image.
        image = Image.frombytes("RGB", (bitmap.width, bitmap.height), bitmap.rgb, "raw", "RGB", bitmap.stride, 1)
        bitmap.rgb.release()
        geometry = PageGeometry(
            dpi=round(scale * POINTS_PER_INCH, 4),
            width_px=bitmap.width,
            height_px=bitmap.height,
            rotation=info.rotation,
            crop_box=tuple(float(v) for v in info.bbox),
        )
        return Page(number=number, image=image, geometry=geometry)

    def _render_here(self, number: int, dpi: float) -> Page:
        """render() in this process, without bounds."""
        import pypdfium2 as pdfium

        try:
            page = self._doc[number - 1]
        except pdfium.PdfiumError as exc:
            raise InputError(f"{self.name}: page {number}: cannot load ({_one_line(exc)})") from exc
        try:
            width_pt, height_pt = page.get_size()  # as displayed: after /Rotate, crop box clipped
            if not (width_pt > 0 and height_pt > 0):
                raise InputError(f"{self.name}: page {number} is empty ({width_pt:g}x{height_pt:g} pt)")
            scale = render_scale(width_pt, height_pt, dpi)
            try:
                bitmap = page.render(
                    scale=scale, may_draw_forms=True, fill_color=(255, 255, 255, 255), rev_byteorder=True
                )  # RGB byte order, as the child renders
            except (pdfium.PdfiumError, MemoryError) as exc:
                raise InputError(f"{self.name}: page {number}: cannot render ({_one_line(exc)})") from exc
            try:
                if bitmap.n_channels != 3:
                    raise RuntimeError(f"pdfium bitmap of {bitmap.n_channels} channels: expected 3 (RGB)")
                # frombytes copies (frombuffer may share): the buffer is freed with the bitmap.
                size = (bitmap.width, bitmap.height)
                image = Image.frombytes("RGB", size, bitmap.buffer, "raw", "RGB", bitmap.stride, 1)
            finally:
                bitmap.close()
            geometry = PageGeometry(
                dpi=round(scale * POINTS_PER_INCH, 4),
                width_px=image.width,
                height_px=image.height,
                rotation=page.get_rotation(),
                crop_box=tuple(float(v) for v in page.get_bbox()),
            )
        finally:
            page.close()
        return Page(number=number, image=image, geometry=geometry)

    def pages(self, numbers: list[int], dpi: float = DEFAULT_DPI) -> Iterator[Page]:
        """The pages in `numbers`, rendered one at a time as the caller asks for them; none is kept."""
        for number in numbers:
            yield self.render(number, dpi)


def _file_size(path: Path, name: str) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise InputError(f"{name}: cannot read ({_one_line(exc.strerror or exc)})") from exc


class _logged:
    """Collect what pypdfium2 logs (it warns through `logging`, which prints to stderr when the application
    configures no logging) into `lines`, instead of letting it reach stderr."""

    def __init__(self, lines: list[str]):
        self._handler = logging.Handler(logging.WARNING)
        self._handler.emit = lambda record: lines.append(record.getMessage())
        self._logger = logging.getLogger("pypdfium2")

    def __enter__(self):
        self._propagate = self._logger.propagate
        self._logger.addHandler(self._handler)
        self._logger.propagate = False
        return self

    def __exit__(self, *_):
        self._logger.removeHandler(self._handler)
        self._logger.propagate = self._propagate


def _open_note(name: str, logged: list[str], said: Said) -> str | None:
    """The one warning about what pdfium and pypdfium2 said while opening (None: nothing said)."""
    if any("XFA" in line for line in logged):
        # An XFA form: pdfium without XFA support draws the page's PDF content (for a static XFA form, its
        # AcroForm copy; for a dynamic one, often just a "please wait" placeholder).
        return f"{name}: the PDF is an XFA form, which this pdfium cannot run: only its plain PDF content is read"
    summary = Said(output="\n".join(logged + [said.output]), warnings=said.warnings).summary()
    return None if summary is None else f"{name}: pdfium: {summary}"


def _loads_without_pages(data: Path | bytes, password: str | None) -> bool:
    """pypdfium2 refuses a document of 0 pages with the same PdfiumError as a failed load, and the error
    code it attaches is stale then (pdfium sets its last error only on failure): load it raw to tell."""
    import pypdfium2.raw as pdfium_c

    pw = (password + "\x00").encode("utf-8") if password else None
    if isinstance(data, Path):
        raw = pdfium_c.FPDF_LoadDocument(os.fsencode(data) + b"\x00", pw)
    else:
        raw = pdfium_c.FPDF_LoadMemDocument64(data, len(data), pw)
    if not raw:
        return False
    try:
        return pdfium_c.FPDF_GetPageCount(raw) == 0
    finally:
        pdfium_c.FPDF_CloseDocument(raw)


def _open_error(exc: pdfium.PdfiumError, name: str, password: str | None) -> str:
    code = getattr(exc, "err_code", None)
    if code == 4 and password:
        return f"{name}: wrong password for the encrypted PDF"
    if code == 4:
        return f"{name}: the PDF is encrypted; give --password"
    if code == 3:
        return f"{name}: not a PDF, or a corrupt or truncated one (pdfium: data format error)"
    what = _PDFIUM_ERRORS.get(code, _one_line(exc))
    return f"{name}: cannot open the PDF (pdfium: {what})"


__all__ = [
    "DEFAULT_DPI",
    "MAX_RENDER_PIXELS",
    "Page",
    "PageGeometry",
    "PageSpec",
    "PdfFile",
    "parse_pages",
    "render_scale",
]
