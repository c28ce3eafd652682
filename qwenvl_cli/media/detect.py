"""What an input file is (image, PDF or video), from its first bytes, never from its name.

Magic numbers for the common formats, Pillow's own header parse as the fallback for the rarer images it
reads, and one-line InputErrors for everything else (missing, empty, unreadable, text, audio, unknown).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO, Literal

from PIL import Image

from qwenvl_cli.errors import InputError
from qwenvl_cli.media.capture import captured_output

Kind = Literal["image", "pdf", "video"]

HEAD_BYTES = 4096  # enough for every signature below (MPEG-TS needs 3 x 188, Ogg's first page ~100)
PDF_SEARCH_BYTES = 1024  # readers accept junk before %PDF- (Acrobat: within the first 1024 bytes)

# (signature, offset): formats named by a fixed byte string at a fixed place.
_IMAGE_MAGIC: tuple[tuple[bytes, int], ...] = (
    (b"\xff\xd8\xff", 0),  # JPEG
    (b"\x89PNG\r\n\x1a\n", 0),  # PNG, APNG
    (b"GIF87a", 0),
    (b"GIF89a", 0),
    (b"BM", 0),  # BMP
    (b"II*\x00", 0),  # TIFF, little-endian
    (b"MM\x00*", 0),  # TIFF, big-endian
    (b"II+\x00", 0),  # BigTIFF
    (b"MM\x00+", 0),
    (b"\x00\x00\x01\x00", 0),  # ICO
    (b"\x00\x00\x02\x00", 0),  # CUR
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", 0),  # JPEG 2000 (JP2 box)
    (b"\xff\x4f\xff\x51", 0),  # JPEG 2000 codestream
    (b"qoif", 0),
    (b"8BPS", 0),  # Photoshop
    (b"icns", 0),
    (b"DDS ", 0),
)
_VIDEO_MAGIC: tuple[tuple[bytes, int], ...] = (
    (b"\x1a\x45\xdf\xa3", 0),  # Matroska, WebM (EBML)
    (b"\x00\x00\x01\xba", 0),  # MPEG program stream
    (b"\x00\x00\x01\xb3", 0),  # MPEG-1/2 video sequence header
    (b"FLV\x01", 0),
    (b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", 0),  # ASF (WMV)
)
_AUDIO_MAGIC: tuple[tuple[bytes, int], ...] = (
    (b"ID3", 0),  # MP3 with an ID3v2 tag
    (b"fLaC", 0),
    (b"#!AMR", 0),
)
_OTHER_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"PK\x03\x04", 0, "a ZIP archive (or .docx/.xlsx/.epub)"),
    (b"\x1f\x8b", 0, "a gzip archive"),
    (b"7z\xbc\xaf\x27\x1c", 0, "a 7-Zip archive"),
    (b"Rar!\x1a\x07", 0, "a RAR archive"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", 0, "an old Microsoft Office file (.doc/.xls/.ppt)"),
    (b"\x7fELF", 0, "an executable"),
)

# ISO-BMFF major brands (bytes 8-12, after `ftyp`) of still images and image sequences; the rest is video.
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1",
                b"avif", b"avis", b"avci", b"avcs", b"jpeg", b"jpgs"}
_AUDIO_BRANDS = {b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B "}
_TEXT_BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")  # UTF-8, UTF-16 LE, UTF-16 BE
# QuickTime files from before `ftyp` existed start with one of these atoms.
_QUICKTIME_ATOMS = {b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}


def detect_kind(source: Path | bytes, name: str) -> Kind:
    """"image", "pdf" or "video" from the content of `source` (a path, or the bytes of stdin); `name` is
    how messages name it. Anything else is an InputError of one line starting with `name`."""
    if isinstance(source, bytes):
        if not source:
            raise InputError(f"{name}: empty (0 bytes)")
        return _classify(source[:HEAD_BYTES], lambda: io.BytesIO(source), name)
    path = Path(source)
    head = read_head(path, name)
    return _classify(head, lambda: path.open("rb"), name)


def read_head(path: Path, name: str) -> bytes:
    """The first HEAD_BYTES of a file; every way of failing to read it is one InputError naming it."""
    try:
        with path.open("rb") as f:
            head = f.read(HEAD_BYTES)
    except FileNotFoundError as exc:
        raise InputError(f"{name}: file not found") from exc
    except IsADirectoryError as exc:
        raise InputError(f"{name}: is a directory") from exc
    except PermissionError as exc:
        raise InputError(f"{name}: permission denied") from exc
    except OSError as exc:
        try:
            is_dir = path.is_dir()  # some systems report EACCES or EISDIR differently
        except OSError:
            is_dir = False  # e.g. a name too long
        if is_dir:
            raise InputError(f"{name}: is a directory") from exc
        raise InputError(f"{name}: cannot read ({' '.join(str(exc.strerror or exc).split())})") from exc
    if not head:
        raise InputError(f"{name}: empty file (0 bytes)")
    return head


def _starts(head: bytes, table) -> bool:
    return any(head[offset : offset + len(magic)] == magic for magic, offset, *_ in table)


def _classify(head: bytes, reopen, name: str) -> Kind:
    if head.startswith(b"%PDF-"):
        return "pdf"
    if head[4:8] == b"ftyp":
        return _iso_bmff(head, reopen, name)
    if _starts(head, _IMAGE_MAGIC) or _is_netpbm(head) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    if _starts(head, _VIDEO_MAGIC) or _is_mpeg_ts(head) or (head[:4] == b"RIFF" and head[8:12] == b"AVI "):
        return "video"
    if head[4:8] in _QUICKTIME_ATOMS and head[0] == 0:  # a first atom under 16 MB (or size 0/1)
        return "video"
    if head[:4] == b"OggS":
        if any(codec in head for codec in (b"\x80theora", b"OVP80", b"BBCD")):
            return "video"
        raise InputError(f"{name}: an Ogg audio file, not an image, PDF or video")
    if head.startswith(_TEXT_BOMS):  # before the MP3 test: FF FE looks like an MPEG audio frame sync
        raise _text_error(head, name)
    if _starts(head, _AUDIO_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WAVE") or _is_mp3_frame(head):
        raise InputError(f"{name}: an audio file, not an image, PDF or video")
    if b"%PDF-" in head[:PDF_SEARCH_BYTES]:
        return "pdf"
    for magic, offset, what in _OTHER_MAGIC:
        if head[offset : offset + len(magic)] == magic:
            raise InputError(f"{name}: {what}, not an image, PDF or video")
    if _pillow_opens(reopen):
        return "image"
    if _is_text(head):
        raise _text_error(head, name)
    raise InputError(f"{name}: unrecognised file format (starts with {head[:8].hex(' ')})")


def _iso_bmff(head: bytes, reopen, name: str) -> Kind:
    """MP4, MOV, 3GP (video) or HEIF/AVIF (image) or M4A (audio), by the ftyp box's major brand."""
    brand = head[8:12]
    if brand in _AUDIO_BRANDS:
        raise InputError(f"{name}: an audio file, not an image, PDF or video")
    if brand not in _HEIF_BRANDS:
        return "video"
    if _pillow_opens(reopen):
        return "image"
    label = brand.decode("latin-1").strip()
    raise InputError(f"{name}: a HEIF/AVIF image (brand '{label}') that this Pillow build cannot read")


def _is_netpbm(head: bytes) -> bool:
    # P1-P7 (PBM, PGM, PPM, PAM) and PF/Pf (PFM), each followed by whitespace.
    return len(head) > 2 and head[0:1] == b"P" and head[1:2] in b"1234567Ff" and head[2:3].isspace()


def _is_mpeg_ts(head: bytes) -> bool:
    # 188-byte packets with sync byte 0x47 (or 192-byte M2TS packets: a 4-byte timecode first).
    for size, start in ((188, 0), (192, 4)):
        starts = range(start, len(head), size)
        if len(starts) >= 3 and all(head[i] == 0x47 for i in list(starts)[:4]):
            return True
    return False


def _is_mp3_frame(head: bytes) -> bool:
    # MPEG audio frame sync: 11 set bits, a valid layer (not 00) and bitrate index (not 1111).
    return len(head) >= 3 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 0x06 != 0 and (
        head[2] & 0xF0 != 0xF0
    )


def _text_error(head: bytes, name: str) -> InputError:
    if b"<svg" in head[:PDF_SEARCH_BYTES].lower():
        return InputError(f"{name}: an SVG drawing, which cannot be read; convert it to PNG first")
    return InputError(f"{name}: a text file, not an image, PDF or video")


def _is_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut at the end of the head
            return _mostly_printable(head)
    return True


def _mostly_printable(head: bytes) -> bool:
    # Latin-1 and other 8-bit text: allow high bytes, refuse control characters other than \t \n \f \r.
    controls = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13))
    return controls == 0


def _pillow_opens(reopen) -> bool:
    """Whether Pillow identifies the file. Image.open parses the header only (no pixels decoded); what its
    plugins warn or print on the way is dropped (load_image reports it when it decodes the file)."""
    try:
        with captured_output():
            fp: BinaryIO = reopen()
            with fp, Image.open(fp):
                return True
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return True  # an image, too big: load_image says so with the numbers
    except Exception:  # UnidentifiedImageError, or a plugin's own error on a malformed header
        return False


__all__ = ["Kind", "detect_kind"]
