"""`qwenvl ground` and `qwenvl extract` as a user runs them, on images and PDFs.

Two kinds of test: the tiny random model end to end (the JSON must parse and validate however random the
weights: constrained decoding), and canned answers (Engine.answer replaced) whose boxes and tables are
checked against hand-computed results through resize, EXIF rotation and PDF points.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from qwenvl_cli.cli import app
from qwenvl_cli.engine import Engine

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
SHAPES = str(SAMPLES / "shapes.png")
RECEIPT = str(SAMPLES / "receipt.png")
MAX_PIXELS = 64 * 28 * 28


@pytest.fixture(scope="module")
def model_dir(make_ckpt):
    return str(make_ckpt(max_pixels=MAX_PIXELS))


def run(*args: str, stdin: bytes | None = None):
    return CliRunner().invoke(app, list(args), input=stdin)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def pdf_of(path: Path, sizes: list[tuple[int, int]], colour=(255, 255, 255)) -> Path:
    """A PDF with one page per (width, height) in points (images saved at 72 dpi: 1 px = 1 pt)."""
    pages = [Image.new("RGB", size, colour) for size in sizes]
    pages[0].save(path, format="PDF", resolution=72.0, save_all=True, append_images=pages[1:])
    return path


# ------------------------------------------------------------------------------------------- ground


def valid_objects(record: dict, key: str, n: int) -> None:
    width, height = record["image_size"]
    for obj in record["objects"]:
        assert set(obj) >= {"label", key} and isinstance(obj["label"], str)
        coords = obj[key]
        assert len(coords) == n and all(isinstance(v, int) for v in coords)
        xs, ys = coords[0::2], coords[1::2]
        assert all(0 <= x <= width for x in xs) and all(0 <= y <= height for y in ys)
        if n == 4:
            assert coords[0] < coords[2] and coords[1] < coords[3]


def test_ground_json_from_the_random_model_always_parses(model_dir):
    found = 0
    for seed in ("0", "1", "2", "3"):
        r = run("ground", SHAPES, "every red shape", "--model", model_dir, "--json", "--max-new-tokens", "160",
                "--temperature", "1", "--seed", seed)
        assert r.exit_code == 0, r.stderr
        [record] = json_lines(r.stdout)
        assert record["file"] == SHAPES and record["query"] == "every red shape"
        assert record["image_size"] == list(Image.open(SHAPES).size)
        valid_objects(record, "bbox_2d", 4)
        found += len(record["objects"])
    assert found >= 1  # not only empty lists


def test_ground_points_from_the_random_model(model_dir):
    found = 0
    for seed in ("0", "1", "2", "3"):
        r = run("ground", SHAPES, "the circle", "--points", "--model", model_dir, "--json", "--max-new-tokens", "120",
                "--temperature", "1", "--seed", seed)
        assert r.exit_code == 0, r.stderr
        record = json_lines(r.stdout)[0]
        valid_objects(record, "point_2d", 2)
        found += len(record["objects"])
    assert found >= 1


def test_ground_schema_keeps_coordinates_on_the_picture():
    from qwenvl_cli.tasks.ground import ground_schema

    schema = ground_schema(points=False, size=(308, 140))
    coords = schema["items"]["properties"]["bbox_2d"]
    assert [a["maximum"] for a in coords["prefixItems"]] == [308, 140, 308, 140]
    assert coords["minItems"] == coords["maxItems"] == 4 and coords["items"] is False


def test_ground_maps_boxes_to_the_original_pixels(model_dir, canned, tmp_path):
    # 1000x500 original; max_pixels 50176 -> smart_resize gives 308x140 (beta = sqrt(500000/50176) = 3.157;
    # floor(1000/3.157/28)*28 = 308, floor(500/3.157/28)*28 = 140). x scale 1000/308, y scale 500/140.
    image = tmp_path / "wide.png"
    Image.new("RGB", (1000, 500), "white").save(image)
    calls = canned('```json\n[\n\t{"bbox_2d": [30, 14, 154, 70], "label": "car"},\n'
                   '\t{"bbox_2d": [300, 130, 400, 200], "label": "off the edge"},\n'
                   '\t{"bbox_2d": [500, 10, 600, 20], "label": "outside"},\n]\n```')
    r = run("ground", str(image), "every car", "--model", model_dir, "--json")
    assert r.exit_code == 0, r.stderr
    [record] = json_lines(r.stdout)
    assert record["objects"] == [
        {"label": "car", "bbox_2d": [97, 50, 500, 250]},  # 30*3.2468=97.4, 154*3.2468=500, 14*3.571=50, 70*3.571=250
        {"label": "off the edge", "bbox_2d": [974, 464, 1000, 500]},  # clamped to the image
    ]  # the box entirely outside is dropped
    assert calls[0] is not None  # decoding was constrained
    text = run("ground", str(image), "every car", "--model", model_dir)
    assert text.stdout.splitlines()[0] == "car  [97, 50, 500, 250]"


def test_ground_follows_exif_orientation(model_dir, canned, tmp_path):
    # Stored 500x1000 with orientation 6 (rotate 90° clockwise to view): upright it is 1000x500, as above.
    image = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (500, 1000), "white").save(image, exif=exif)
    canned('[{"bbox_2d": [30, 14, 154, 70], "label": "car"}]')
    record = json_lines(run("ground", str(image), "car", "--model", model_dir, "--json").stdout)[0]
    assert record["image_size"] == [1000, 500]
    assert record["objects"][0]["bbox_2d"] == [97, 50, 500, 250]


def test_ground_on_a_pdf_page_gives_pixels_and_pdf_points(model_dir, canned, tmp_path):
    # A 200x100 pt page at --dpi 72 renders 200x100 px; smart_resize -> 196x112.
    # Model box [49, 28, 98, 56] -> page pixels [50, 25, 100, 50] -> PDF points (origin bottom-left,
    # y up): x the same, y = 100 - y -> [50, 50, 100, 75].
    pdf = pdf_of(tmp_path / "page.pdf", [(200, 100), (200, 100)])
    canned('```json\n[{"bbox_2d": [49, 28, 98, 56], "label": "logo"}]\n```')
    r = run("ground", str(pdf), "the logo", "--model", model_dir, "--json", "--dpi", "72", "--pages", "2")
    assert r.exit_code == 0, r.stderr
    [record] = json_lines(r.stdout)
    assert record["page"] == 2 and record["dpi"] == 72
    assert record["image_size"] == [200, 100]
    [obj] = record["objects"]
    assert obj["bbox_2d"] == [50, 25, 100, 50]
    assert obj["bbox_pdf"] == pytest.approx([50, 50, 100, 75], abs=0.01)


def test_ground_draw_writes_the_boxes(model_dir, canned, tmp_path):
    image = tmp_path / "plain.png"
    Image.new("RGB", (1000, 500), "white").save(image)
    canned('[{"bbox_2d": [30, 14, 154, 70], "label": "car"}]')
    out = tmp_path / "boxes.png"
    r = run("ground", str(image), "car", "--model", model_dir, "--json", "--draw", str(out))
    assert r.exit_code == 0, r.stderr
    assert json_lines(r.stdout)[0]["drawing"] == str(out)
    drawn = Image.open(out).convert("RGB")
    assert drawn.size == (1000, 500)
    assert drawn.getpixel((300, 249)) != (255, 255, 255)  # on the bottom edge of [97, 50, 500, 250)
    assert drawn.getpixel((300, 150)) == (255, 255, 255)  # inside the box, away from the label
    assert drawn.getpixel((700, 400)) == (255, 255, 255)  # outside


def test_ground_draw_names_one_file_per_picture(model_dir, canned, tmp_path):
    pdf = pdf_of(tmp_path / "two.pdf", [(200, 100), (200, 100)])
    canned('[{"bbox_2d": [49, 28, 98, 56], "label": "x"}]')
    out = tmp_path / "out.png"
    r = run("ground", str(pdf), SHAPES, "x", "--model", model_dir, "--draw", str(out), "--dpi", "72")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in tmp_path.glob("out-*.png")) == ["out-shapes.png", "out-two-p1.png", "out-two-p2.png"]


def test_ground_usage_errors(model_dir):
    r = run("ground", SHAPES, "--model", model_dir)
    assert r.exit_code == 2 and "what to find" in r.stderr
    r = run("ground", SHAPES, "  ", "--model", model_dir)
    assert r.exit_code == 2


def test_ground_truncated_answer_keeps_the_complete_boxes(model_dir, canned, tmp_path):
    canned('```json\n[{"bbox_2d": [0, 0, 28, 28], "label": "a"}, {"bbox_2d": [5, 5', finish_reason="length")
    r = run("ground", SHAPES, "a", "--model", model_dir, "--json")
    assert r.exit_code == 0
    assert [o["label"] for o in json_lines(r.stdout)[0]["objects"]] == ["a"]
    assert "--max-new-tokens" in r.stderr


# ------------------------------------------------------------------------------------------ extract


def test_extract_text_streams_per_pdf_page(model_dir, tmp_path):
    pdf = pdf_of(tmp_path / "doc.pdf", [(300, 200)] * 3)
    r = run("extract", str(pdf), "--model", model_dir, "--max-new-tokens", "3", "--dpi", "72")
    assert r.exit_code == 0, r.stderr
    headers = [line for line in r.stdout.splitlines() if line.startswith("==> ")]
    assert headers == [f"==> {pdf} (page {n}) <==" for n in (1, 2, 3)]
    r = run("extract", str(pdf), "--model", model_dir, "--max-new-tokens", "3", "--json", "--pages", "3,1", "--dpi", "72")
    assert [(rec["file"], rec["page"]) for rec in json_lines(r.stdout)] == [(str(pdf), 3), (str(pdf), 1)]


def test_extract_fields_gives_exactly_those_keys(model_dir):
    for seed in ("0", "1"):
        r = run("extract", RECEIPT, "--fields", "invoice number, date,total", "--model", model_dir, "--json",
                "--max-new-tokens", "700", "--temperature", "1", "--seed", seed)
        assert r.exit_code == 0, r.stderr
        data = json_lines(r.stdout)[0]["data"]
        assert list(data) == ["invoice number", "date", "total"]
        assert all(v is None or (isinstance(v, str) and len(v) <= 200) for v in data.values())


def test_extract_schema_output_validates(model_dir, tmp_path):
    schema = {
        "type": "object",
        "properties": {
            "vendor": {"type": "string", "maxLength": 20},
            "paid": {"type": "boolean"},
            "items": {"type": "array", "maxItems": 3,
                      "items": {"type": "object", "properties": {"qty": {"type": "integer"}}, "required": ["qty"],
                                "additionalProperties": False}},
        },
        "required": ["vendor", "paid", "items"],
        "additionalProperties": False,
    }
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    r = run("extract", RECEIPT, "--schema", str(path), "--model", model_dir, "--max-new-tokens", "300")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)  # text mode prints the JSON itself
    assert set(data) == {"vendor", "paid", "items"}
    assert isinstance(data["vendor"], str) and len(data["vendor"]) <= 20 and isinstance(data["paid"], bool)
    assert len(data["items"]) <= 3 and all(set(i) == {"qty"} and isinstance(i["qty"], int) for i in data["items"])


def test_extract_schema_file_problems_are_usage_errors(model_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = run("extract", RECEIPT, "--schema", str(bad), "--model", model_dir)
    assert r.exit_code == 2 and str(bad) in r.stderr and "not valid JSON" in r.stderr
    r = run("extract", RECEIPT, "--schema", str(tmp_path / "missing.json"), "--model", model_dir)
    assert r.exit_code == 2 and "not found" in r.stderr
    r = run("extract", RECEIPT, "--fields", "a", "--schema", str(bad))
    assert r.exit_code == 2 and "give one" in r.stderr
    r = run("extract", RECEIPT, "--fields", " , ", "--model", model_dir)
    assert r.exit_code == 2


def test_extract_json_gives_text_lines_with_boxes(model_dir):
    r = run("extract", RECEIPT, "--json", "--model", model_dir, "--max-new-tokens", "200")
    assert r.exit_code == 0, r.stderr
    [record] = json_lines(r.stdout)
    assert record["text"] == "\n".join(line["text"] for line in record["lines"])
    width, height = record["image_size"]
    for line in record["lines"]:
        x1, y1, x2, y2 = line["bbox_2d"]
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height


TABLES_HTML = (
    "```html\n<html><body><h1>Invoice</h1>"
    "<table><tr><th>Item</th><th>Price</th></tr><tr><td>Tea, green</td><td>3.50</td></tr></table>"
    "<p>Thanks</p><table><tr><td>Total</td><td>3.50</td></tr></table></body></html>\n```"
)


def test_extract_tables_in_each_format(model_dir, canned, tmp_path):
    calls = canned(TABLES_HTML)
    r = run("extract", SHAPES, "--format", "csv", "--model", model_dir)
    assert r.exit_code == 0, r.stderr
    assert r.stdout == 'Item,Price\n"Tea, green",3.50\n\nTotal,3.50\n'
    assert calls[-1] is None  # HTML is free text
    r = run("extract", SHAPES, "--format", "markdown", "--model", model_dir)
    assert "| Item | Price |" in r.stdout and "| Tea, green | 3.50 |" in r.stdout
    r = run("extract", SHAPES, "--format", "json", "--model", model_dir, "--json")
    [record] = json_lines(r.stdout)
    assert record["format"] == "json"
    assert record["tables"][0] == [{"Item": "Tea, green", "Price": "3.50"}]
    out = tmp_path / "csv"
    r = run("extract", SHAPES, "--format", "csv", "--model", model_dir, "-o", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["shapes.png.table1.csv", "shapes.png.table2.csv"]
    assert (out / "shapes.png.table2.csv").read_text() == "Total,3.50\n"


def test_extract_without_tables_says_so(model_dir, canned):
    canned("<p>no tables here</p>")
    r = run("extract", SHAPES, "--format", "csv", "--model", model_dir)
    assert r.exit_code == 0 and r.stdout == ""
    assert "no tables found" in r.stderr


def test_extract_option_clashes(model_dir):
    assert run("extract", SHAPES, "--fields", "a", "--format", "csv").exit_code == 2
    assert run("extract", SHAPES, "--json", "--together").exit_code == 2
    assert run("extract", SHAPES, "--format", "xml").exit_code == 2


# --------------------------------------------------------------------------------------------- PDFs


def test_pages_errors(model_dir, tmp_path):
    pdf = pdf_of(tmp_path / "five.pdf", [(100, 100)] * 5)
    r = run("describe", str(pdf), "--pages", "2-x", "--model", model_dir)
    assert r.exit_code == 2 and "--pages" in r.stderr
    r = run("describe", str(pdf), SHAPES, "--pages", "9", "--model", model_dir, "--json", "--max-new-tokens", "1")
    assert r.exit_code == 1
    [line] = r.stderr.splitlines()
    assert str(pdf) in line and "9" in line and "5 pages" in line
    assert [rec["file"] for rec in json_lines(r.stdout)] == [str(pdf), SHAPES]  # the image still answers


def test_encrypted_pdf_needs_the_password(model_dir, tmp_path):
    from pypdf import PdfReader, PdfWriter

    plain = pdf_of(tmp_path / "plain.pdf", [(100, 100)])
    writer = PdfWriter()
    writer.append(PdfReader(plain))
    writer.encrypt(user_password="s3cret", algorithm="RC4-128")
    locked = tmp_path / "locked.pdf"
    with open(locked, "wb") as f:
        writer.write(f)
    r = run("describe", str(locked), "--model", model_dir, "--max-new-tokens", "1")
    assert r.exit_code == 1 and "--password" in r.stderr and str(locked) in r.stderr
    r = run("describe", str(locked), "--model", model_dir, "--max-new-tokens", "1", "--password", "wrong")
    assert r.exit_code == 1 and "password" in r.stderr
    r = run("describe", str(locked), "--model", model_dir, "--max-new-tokens", "1", "--password", "s3cret", "--json")
    assert r.exit_code == 0, r.stderr
    assert json_lines(r.stdout)[0]["page"] == 1


def test_pdf_detected_by_content_not_extension(model_dir, tmp_path):
    disguised = pdf_of(tmp_path / "scan.jpg", [(100, 100)])
    r = run("describe", str(disguised), "--model", model_dir, "--json", "--max-new-tokens", "1")
    assert r.exit_code == 0, r.stderr
    assert json_lines(r.stdout)[0]["page"] == 1
    png_as_pdf = tmp_path / "image.pdf"
    png_as_pdf.write_bytes(Path(SHAPES).read_bytes())
    r = run("describe", str(png_as_pdf), "--model", model_dir, "--json", "--max-new-tokens", "1")
    assert r.exit_code == 0, r.stderr
    assert "page" not in json_lines(r.stdout)[0]


def test_pdf_from_stdin_and_directories(model_dir, tmp_path):
    (tmp_path / "d").mkdir()
    pdf = pdf_of(tmp_path / "d" / "x.pdf", [(100, 100)] * 2)
    r = run("describe", "-", "--model", model_dir, "--json", "--max-new-tokens", "1", stdin=pdf.read_bytes())
    assert [(rec["file"], rec["page"]) for rec in json_lines(r.stdout)] == [("-", 1), ("-", 2)]
    r = run("describe", str(tmp_path / "d"), "-r", "--model", model_dir, "--json", "--max-new-tokens", "1")
    assert [rec["page"] for rec in json_lines(r.stdout)] == [1, 2]


def test_together_puts_pages_in_one_prompt_and_refuses_past_the_context(make_ckpt, tmp_path):
    small = str(make_ckpt(max_pixels=MAX_PIXELS, text={"max_position_embeddings": 400}))
    pdf = pdf_of(tmp_path / "many.pdf", [(200, 200)] * 10)  # 49 vision tokens a page at 72 dpi
    r = run("describe", str(pdf), "--pages", "1-2", "--together", "--model", small, "--json", "--max-new-tokens", "2",
            "--dpi", "72")
    assert r.exit_code == 0, r.stderr
    [record] = json_lines(r.stdout)
    assert record["file"] == [str(pdf)]
    assert record["pages"] == [{"file": str(pdf), "page": 1}, {"file": str(pdf), "page": 2}]
    r = run("describe", str(pdf), "--together", "--model", small, "--dpi", "72")
    assert r.exit_code == 1
    [line] = r.stderr.splitlines()
    assert "--together" in line and "400" in line and "vision tokens" in line


def test_constrained_boxes_stay_within_the_resized_picture(model_dir):
    """The raw answer (before any clamping) never names a coordinate off the picture the model saw."""
    from qwenvl_cli.jsonfix import parse_lenient
    from qwenvl_cli.tasks.ground import ground_prompt, ground_schema

    engine = Engine.load(model_dir, device="cpu", dtype="float32")
    size = (56, 28)
    constraint = engine.json_constraint(ground_schema(False, size), fenced=True)
    prompt = engine.prompt([ground_prompt("every shape", False)])
    coords = []
    for seed in range(4):
        params = engine.sampling(max_new_tokens=200, temperature=1.0, top_k=0, top_p=1.0, seed=seed)
        answer = engine.answer(prompt, params, constraint=constraint)
        assert answer.text.startswith("```json\n")
        if answer.finish_reason == "stop":
            coords += [item["bbox_2d"] for item in parse_lenient(answer.text)]
    assert coords, "no complete box in four answers"
    assert all(0 <= x <= 56 and 0 <= y <= 28 for x1, y1, x2, y2 in coords for x, y in ((x1, y1), (x2, y2)))


def test_unsupported_schema_is_one_short_usage_line(model_dir, tmp_path):
    path = tmp_path / "unique.json"
    path.write_text(json.dumps({"type": "object", "properties": {"t": {"type": "array", "uniqueItems": True}}}))
    r = run("extract", RECEIPT, "--schema", str(path), "--model", model_dir)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"qwenvl: --schema {path}: JSON schema not supported for constrained output: Unimplemented keys: [\"uniqueItems\"]"
    ]


def test_draw_paths_never_collide_and_are_checked_first(model_dir, canned, tmp_path):
    canned('[{"bbox_2d": [0, 0, 28, 28], "label": "x"}]')
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        Image.new("RGB", (60, 40), "white").save(tmp_path / sub / "x.png")
    out = tmp_path / "out.png"
    r = run("ground", str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"), "x", "--model", model_dir,
            "--json", "--draw", str(out))
    assert [rec["drawing"] for rec in json_lines(r.stdout)] == [str(tmp_path / "out-x.png"), str(tmp_path / "out-x-2.png")]
    folder = tmp_path / "new" / "drawings"
    r = run("ground", str(tmp_path / "a" / "x.png"), "x", "--model", model_dir, "--draw", f"{folder}/")
    assert r.exit_code == 0 and (folder / "x.png.boxes.png").is_file()
    # A bad --draw is a usage error before the model loads (the model path does not even exist).
    r = run("ground", SHAPES, "x", "--model", str(tmp_path / "no-model"), "--draw", str(tmp_path / "out.txt"))
    assert r.exit_code == 2 and "unknown image suffix" in r.stderr
    r = run("ground", SHAPES, "x", "--model", str(tmp_path / "no-model"), "--draw", str(tmp_path / "nodir" / "o.png"))
    assert r.exit_code == 2 and "no directory" in r.stderr


def test_ground_refuses_a_query_that_is_a_file(model_dir):
    r = run("ground", SHAPES, RECEIPT, "--model", model_dir)
    assert r.exit_code == 2 and "names a file" in r.stderr


def test_errors_while_answering_name_their_input(model_dir, tmp_path):
    pdf = pdf_of(tmp_path / "two.pdf", [(100, 100)] * 2)
    r = run("extract", SHAPES, str(pdf), "--fields", "a,b", "--max-new-tokens", "3", "--model", model_dir, "--dpi", "72")
    assert r.exit_code == 1
    lines = r.stderr.splitlines()
    assert [line.split(": ", 2)[1] for line in lines] == [SHAPES, f"{pdf} (page 1)", f"{pdf} (page 2)"]
    assert all("cut off at 3 tokens" in line for line in lines)


def test_ground_cut_off_before_any_box_is_an_error(model_dir, canned):
    canned('```json\n[\n\t{"bbox_2d": [10, 2', finish_reason="length")
    r = run("ground", SHAPES, "thing", "--model", model_dir, "--json")
    assert r.exit_code == 1
    assert "before any complete box" in r.stderr and SHAPES in r.stderr


def test_find_output_on_stdin(model_dir, tmp_path):
    """`find DIR | qwenvl ... -`: find prints the directory itself too; a vanished file fails alone."""
    (tmp_path / "scans").mkdir()
    image = tmp_path / "scans" / "a.png"
    image.write_bytes(Path(SHAPES).read_bytes())
    listing = f"{tmp_path / 'scans'}\n{image}\n{tmp_path / 'scans' / 'gone.png'}\n"
    r = run("describe", "-", "--model", model_dir, "--json", "--max-new-tokens", "1", stdin=listing.encode())
    assert r.exit_code == 1
    records = json_lines(r.stdout)
    assert [rec["file"] for rec in records] == [str(image), str(tmp_path / "scans" / "gone.png")]
    assert "text" in records[0] and "not found" in records[1]["error"]


def test_a_lowered_dpi_is_said(model_dir, tmp_path):
    pdf = pdf_of(tmp_path / "poster.pdf", [(3000, 2000)])  # 3000 x 2000 pt: 104 MP at 300 dpi
    r = run("describe", str(pdf), "--dpi", "300", "--model", model_dir, "--json", "--max-new-tokens", "1")
    assert r.exit_code == 0, r.stderr
    [line] = r.stderr.splitlines()
    assert "(page 1): rendered at" in line and "instead of 300" in line
