"""Inputs -> the pictures a task looks at: an image file gives one, a PDF one per selected page (rendered
lazily, one at a time). The file type comes from the content, not the extension.

Each `Visual` keeps what is needed to map the model's coordinates back: the upright original image's size
and, for PDF pages, the page geometry (dpi, crop box, rotation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from PIL import Image

from qwenvl_cli.errors import InputError
from qwenvl_cli.inputs import InputItem
from qwenvl_cli.media.detect import detect_kind
from qwenvl_cli.media.image import load_image
from qwenvl_cli.media.pdf import DEFAULT_DPI, MAX_RENDER_PIXELS, PageGeometry, PageSpec, PdfFile
from qwenvl_cli.progress import SILENT, Feedback


@dataclass(frozen=True)
class DocumentOptions:
    pages: PageSpec | None = None  # None: every page
    dpi: float = DEFAULT_DPI
    password: str | None = None


@dataclass(frozen=True)
class Visual:
    name: str  # the input as named on the command line
    image: Image.Image  # RGB, upright
    page: int | None = None  # 1-based, for PDF pages
    geometry: PageGeometry | None = None  # PDF pages only

    @property
    def label(self) -> str:
        return self.name if self.page is None else f"{self.name} (page {self.page})"


def visuals(
    item: InputItem,
    options: DocumentOptions,
    on_warning: Callable[[str], None],
    feedback: Feedback = SILENT,
) -> Iterator[Visual]:
    """The pictures of one input, in order. Raises InputError (naming the file) for unusable inputs;
    a failure while rendering a later page ends the iteration with that error."""
    source = item.source()
    kind = detect_kind(source, item.name)
    if kind == "image":
        yield Visual(item.name, load_image(source, name=item.name, on_warning=on_warning))
        return
    if kind == "video":
        raise InputError(f"{item.name}: a video file; this command reads images and PDFs")
    with PdfFile.open(source, item.name, password=options.password) as pdf:
        numbers = options.pages.resolve(pdf.page_count, item.name) if options.pages else list(range(1, pdf.page_count + 1))
        feedback.pages_started(item.name, len(numbers))
        for page in pdf.pages(numbers, options.dpi):
            if page.geometry.dpi < options.dpi * 0.999:
                on_warning(
                    f"{item.name} (page {page.number}): rendered at {page.geometry.dpi:g} dpi instead of "
                    f"{options.dpi:g}: the page is too large for {MAX_RENDER_PIXELS:,} pixels"
                )
            yield Visual(item.name, page.image, page.number, page.geometry)
            feedback.page_done()
