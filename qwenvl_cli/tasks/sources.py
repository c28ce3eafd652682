"""Inputs -> what a task looks at, in order: a `Still` (an image file, or one rendered PDF page) or a `Clip`
(the frames sampled from a video, or from one `--segment` of it). The file type comes from the content,
not the extension; PDF pages are rendered and video segments decoded lazily, one at a time.

A `Part` names which piece of an input an answer is about (page 3, segment 2): one reference that labels,
`==>` headers, output file names, JSON fields and --draw names all derive from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Union

from PIL import Image

from qwenvl_cli.errors import InputError
from qwenvl_cli.inputs import InputItem
from qwenvl_cli.media.detect import detect_kind
from qwenvl_cli.media.image import load_image
from qwenvl_cli.media.pdf import DEFAULT_DPI, MAX_RENDER_PIXELS, PageGeometry, PageSpec, PdfFile
from qwenvl_cli.progress import SILENT, Feedback

if TYPE_CHECKING:
    from qwenvl_cli.media.video import SampledVideo


@dataclass(frozen=True)
class Part:
    """Page N of a PDF or segment N of a video (1-based); `span` is a segment's range in seconds."""

    kind: str  # "page" | "segment"
    number: int
    span: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("page", "segment") or self.number < 1:
            raise ValueError(f"part {self.kind} {self.number}: expected page or segment, numbered from 1")

    @property
    def label(self) -> str:
        """`page 3`, or `segment 2, 00:01:00.000-00:02:00.000`."""
        if self.kind == "segment" and self.span is not None:
            from qwenvl_cli.media.video import format_time

            return f"segment {self.number}, {format_time(self.span[0])}-{format_time(self.span[1])}"
        return f"{self.kind} {self.number}"

    @property
    def tag(self) -> str:
        """Short name for file names: `p3`, `s2` (`doc.pdf.p3.txt`, `--draw OUT-p3.png`)."""
        return f"{self.kind[0]}{self.number}"

    @property
    def fields(self) -> dict[str, int]:
        """The JSON fields: {"page": 3} or {"segment": 2}."""
        return {self.kind: self.number}


def labelled(name: str, part: Part | None) -> str:
    """`doc.pdf (page 3)`: how messages and headers name an input's part."""
    return name if part is None else f"{name} ({part.label})"


@dataclass(frozen=True)
class SourceOptions:
    """How inputs become stills and clips: PDF pages, rendering and password; video sampling, and
    `segment` seconds per answer (None: the whole clip at once)."""

    pages: PageSpec | None = None  # None: every page
    dpi: float = DEFAULT_DPI
    password: str | None = None
    video: Any = None  # media.video.VideoOptions; None: its defaults
    segment: float | None = None
    videos: bool = True  # False: a video input is refused (the command reads images and PDFs only)

    def __post_init__(self) -> None:
        if self.segment is not None and not (math.isfinite(self.segment) and self.segment > 0):
            from qwenvl_cli.errors import UsageError

            raise UsageError(f"--segment must be a positive number of seconds, got {self.segment}")


@dataclass(frozen=True)
class Still:
    """A picture: an image file, or a rendered PDF page (with its geometry for mapping boxes to points)."""

    name: str  # the input as named on the command line
    image: Image.Image  # RGB, upright
    part: Part | None = None
    geometry: PageGeometry | None = None  # PDF pages only

    @property
    def label(self) -> str:
        return labelled(self.name, self.part)


@dataclass(frozen=True)
class Clip:
    """Frames sampled from a video (or one segment of it), with their presentation times in the source."""

    name: str
    video: SampledVideo
    part: Part | None = None

    @property
    def label(self) -> str:
        return labelled(self.name, self.part)

    @property
    def offset(self) -> float:
        """Seconds of the source at which the model's time 0 lies: its first frame's presentation time."""
        return self.video.timestamps[0]


@dataclass(frozen=True)
class Broken:
    """A page or segment that could not be read; the input's other parts still answer."""

    name: str
    part: Part
    error: str

    @property
    def label(self) -> str:
        return labelled(self.name, self.part)


Source = Union[Still, Clip]


def sources(
    item: InputItem,
    options: SourceOptions,
    on_warning: Callable[[str], None],
    feedback: Feedback = SILENT,
) -> Iterator[Source | Broken]:
    """The stills or clips of one input, in order. Raises InputError (naming the file) for unusable inputs;
    a page or segment that fails is yielded as `Broken` (its message naming the part), and the rest follow."""
    source = item.source()
    kind = detect_kind(source, item.name)
    if kind == "image":
        yield Still(item.name, load_image(source, name=item.name, on_warning=on_warning))
    elif kind == "video":
        if not options.videos:
            raise InputError(f"{item.name}: a video file; this command reads images and PDFs (qwenvl video reads videos)")
        yield from _clips(item, source, options, on_warning, feedback)
    else:
        yield from _pages(item, source, options, on_warning, feedback)


def _pages(item, source, options: SourceOptions, on_warning, feedback: Feedback) -> Iterator[Still | Broken]:
    with PdfFile.open(source, item.name, password=options.password, on_warning=on_warning) as pdf:
        numbers = options.pages.resolve(pdf.page_count, item.name) if options.pages else list(range(1, pdf.page_count + 1))
        feedback.pages_started(item.name, len(numbers))
        for number in numbers:
            part = Part("page", number)
            try:
                page = pdf.render(number, options.dpi)
            except InputError as exc:
                yield Broken(item.name, part, _named(str(exc), item.name, part))
                feedback.page_done()
                continue
            if page.geometry.dpi < options.dpi * 0.999:
                on_warning(
                    f"{labelled(item.name, part)}: rendered at {page.geometry.dpi:g} dpi instead of "
                    f"{options.dpi:g}: the page is too large for {MAX_RENDER_PIXELS:,} pixels"
                )
            yield Still(item.name, page.image, part, page.geometry)
            feedback.page_done()


def segment_spans(start: float, end: float, length: float) -> list[tuple[float, float]]:
    """[start, end) cut into consecutive spans of `length` seconds; a last piece under a quarter of
    `length` joins the one before it rather than make a clip too short to sample."""
    spans = []
    t = start
    while t < end - 1e-9:
        spans.append((t, min(t + length, end)))
        t += length
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < length / 4:
        last = spans.pop()
        spans[-1] = (spans[-1][0], last[1])
    return spans


def _clips(item, source, options: SourceOptions, on_warning, feedback: Feedback) -> Iterator[Clip | Broken]:
    """The whole video as one clip, or with --segment one clip per span, the file scanned once."""
    from dataclasses import replace

    from qwenvl_cli.media.video import VideoFile, VideoOptions, format_time

    video_options = options.video or VideoOptions()
    video = VideoFile(source, item.name)
    for note in video.notes:  # each already names the file
        on_warning(note)
    if options.segment is None:
        sampled = video.sample(video_options)
        for note in sampled.notes:
            on_warning(note)
        yield Clip(item.name, sampled)
        return
    duration = video.info.duration
    start = video_options.start or 0.0
    end = min(video_options.end if video_options.end is not None else duration, duration)
    if start >= end:
        raise InputError(
            f"{item.name}: --start {format_time(start)} is past the end of the video (duration {format_time(duration)})"
        )
    spans = segment_spans(start, end, options.segment)
    feedback.pages_started(item.name, len(spans), unit="segments")
    for number, (a, b) in enumerate(spans, 1):
        part = Part("segment", number, (a, b))
        try:
            sampled = video.sample(replace(video_options, start=a, end=b))
        except InputError as exc:
            yield Broken(item.name, part, _named(str(exc), item.name, part))
            feedback.page_done()
            continue
        for note in sampled.notes:
            on_warning(_named(note, item.name, part))
        yield Clip(item.name, sampled, part)
        feedback.page_done()


def _named(message: str, name: str, part: Part) -> str:
    """`doc.pdf (page 3): problem`, from a message that may already start with `doc.pdf: `."""
    prefix = f"{name}: "
    rest = message[len(prefix) :] if message.startswith(prefix) else message
    for own in (f"{part.kind} {part.number}: ", f"{part.kind} {part.number} "):  # "page 3: cannot render"
        if rest.startswith(own):
            rest = rest[len(own) :]
            break
    return f"{labelled(name, part)}: {rest}"
