"""Write tiny copies of each benchmark in its published file layout, for tests/test_benchmarks.py.

Run from anywhere: `python tests/data/benchmarks/make_tiny_benchmarks.py`. The output is committed;
rerun only when the fixtures change. Images are 16x16 with a per-image pattern, so a test can tell
them apart and check MMMU's decoded pixels.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
SIZE = 16


def tiny_image(seed: int) -> Image.Image:
    """A 16x16 RGB gradient whose colours depend on `seed`."""
    image = Image.new("RGB", (SIZE, SIZE))
    image.putdata([
        ((seed * 53 + x * 16) % 256, (seed * 97 + y * 16) % 256, (seed * 31 + x * y) % 256)
        for y in range(SIZE)
        for x in range(SIZE)
    ])
    return image


def save_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tiny_image(seed).save(path)


def image_bytes(seed: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    tiny_image(seed).save(buffer, format=fmt)
    return buffer.getvalue()


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def make_coco() -> None:
    root = HERE / "coco_captions"

    def entry(cocoid: int, split: str, captions: list[str], imgid: int) -> dict:
        filename = f"COCO_val2014_{cocoid:012d}.jpg"
        return {
            "filepath": "val2014",
            "sentids": list(range(imgid * 5, imgid * 5 + len(captions))),
            "filename": filename,
            "imgid": imgid,
            "split": split,
            "sentences": [
                {"tokens": caption.lower().rstrip(".").split(), "raw": caption, "imgid": imgid, "sentid": imgid * 5 + index}
                for index, caption in enumerate(captions)
            ],
            "cocoid": cocoid,
        }

    images = [
        entry(391895, "test", ["A man with a red helmet on a small moped on a dirt road. ", "Man riding a motor bike on a dirt road."], 0),
        entry(522418, "val", ["A woman wearing a net on her head cutting a cake."], 1),
        entry(184613, "test", ["A child holding a flowered umbrella and petting a yak."], 2),
        entry(318219, "restval", ["A young boy standing in front of a computer keyboard."], 3),
    ]
    write_json(root / "dataset_coco.json", {"images": images, "dataset": "coco"})
    for seed, image in enumerate(images):
        if image["split"] in ("test", "val"):
            save_image(root / image["filepath"] / image["filename"], seed)


def make_gqa() -> None:
    root = HERE / "gqa"

    def question(image_id: str, text: str, answer: str, full_answer: str) -> dict:
        return {
            "semantic": [{"operation": "select", "dependencies": [], "argument": "scene"}],
            "entailed": [],
            "equivalent": [],
            "question": text,
            "imageId": image_id,
            "isBalanced": True,
            "groups": {"global": None, "local": "10c-weather"},
            "answer": answer,
            "semanticStr": "select: scene->verify weather: overcast",
            "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
            "types": {"detailed": "weatherVerify", "semantic": "global", "structural": "verify"},
            "fullAnswer": full_answer,
        }

    questions = {
        "201307251": question("n161313", "Is it overcast?", "no", "No, it is clear."),
        "201640614": question("n235859", "Who is wearing the dress?", "woman", "The woman is wearing a dress."),
        "202225914": question("n161313", "Does the shirt have a different color than the sky?", "yes", "Yes, the shirt is white and the sky is blue."),
    }
    write_json(root / "testdev_balanced_questions.json", questions)
    save_image(root / "images" / "n161313.jpg", 10)
    save_image(root / "images" / "n235859.jpg", 11)


def make_llava_bench() -> None:
    root = HERE / "llava_bench"
    write_jsonl(
        root / "questions.jsonl",
        [
            {"image": "001.jpg", "text": "What is the name of this famous sight in the photo?", "category": "conv", "question_id": 0},
            {"image": "001.jpg", "text": "Describe this photo in detail.", "category": "detail", "question_id": 1},
            {"image": "002.jpg", "text": "What might be the purpose of this painting?", "category": "complex", "question_id": 2},
        ],
    )
    gpt4_answers = {
        0: "The famous sight in the photo is Diamond Head.",
        1: "The photo shows a coastal city next to a crater.",
        2: "It is a humorous take on a classic portrait.",
    }
    write_jsonl(
        root / "answers_gpt4.jsonl",
        [
            {"question_id": question_id, "prompt": "", "text": text, "answer_id": f"a{question_id}",
             "model_id": "gpt-4-0314", "metadata": {}}
            for question_id, text in gpt4_answers.items()
        ],
    )
    save_image(root / "images" / "001.jpg", 20)
    save_image(root / "images" / "002.jpg", 21)


def make_mmmu() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [("id", pa.string()), ("question", pa.string()), ("options", pa.string()), ("explanation", pa.string())]
        + [(f"image_{index}", image_struct) for index in range(1, 8)]
        + [("img_type", pa.string()), ("answer", pa.string()), ("topic_difficulty", pa.string()),
           ("question_type", pa.string()), ("subfield", pa.string())]
    )

    def row(sample_id: str, question: str, options: str, answer: str, question_type: str, image: dict | None) -> dict:
        record = {"id": sample_id, "question": question, "options": options, "explanation": "",
                  "img_type": "['Tables']", "answer": answer, "topic_difficulty": "Medium",
                  "question_type": question_type, "subfield": "Financial Accounting"}
        record.update({f"image_{index}": None for index in range(1, 8)})
        record["image_1"] = image
        return record

    subjects = {
        "Accounting": [
            row("validation_Accounting_1", "Refer to <image 1>. Which account has the largest balance?",
                "['Cash', 'Inventory', 'Equipment', 'Land']", "B", "multiple-choice",
                {"bytes": image_bytes(30, "PNG"), "path": "image_1.png"}),
            row("validation_Accounting_2", "A firm earns $5 on sales of $20. What is its margin?",
                "['20%', '25%']", "B", "multiple-choice", None),
        ],
        "Art": [
            row("validation_Art_1", "<image 1> In which year was this painting made?", "[]", "1889", "open",
                {"bytes": image_bytes(31, "JPEG"), "path": "image_1.jpg"}),
        ],
    }
    for subject, rows in subjects.items():
        path = HERE / "mmmu" / subject / "validation-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def make_scienceqa() -> None:
    root = HERE / "scienceqa"

    def problem(question: str, choices: list[str], answer: int, hint: str, image: str | None, split: str) -> dict:
        return {"question": question, "choices": choices, "answer": answer, "hint": hint, "image": image,
                "task": "closed choice", "grade": "grade2", "subject": "natural science", "topic": "physics",
                "category": "Materials", "skill": "Identify properties of an object", "lecture": "", "solution": "",
                "split": split}

    problems = {
        "5": problem("Which property do these three objects have in common?", ["shiny", "slippery", "opaque"], 2,
                     "Select the best answer.", "image.png", "test"),
        "6": problem("Which animal's mouth is also adapted for bottom feeding?", ["sturgeon", "discus"], 0,
                     "", "image.png", "test"),
        "7": problem("Which word would you find on a dictionary page?", ["ten", "third"], 1, "", None, "test"),
        "8": problem("Which is a compound sentence?", ["Tim ran.", "Tim ran, and Sue hid."], 1, "", "image.png", "train"),
    }
    write_json(root / "problems.json", problems)
    write_json(root / "pid_splits.json", {"train": ["8"], "val": [], "test": ["5", "6", "7"], "minival": []})
    save_image(root / "images" / "test" / "5" / "image.png", 40)
    save_image(root / "images" / "test" / "6" / "image.png", 41)
    save_image(root / "images" / "train" / "8" / "image.png", 42)


def make_chartqa() -> None:
    root = HERE / "chartqa" / "test"
    write_json(root / "test_human.json", [
        {"imgname": "41699051005347.png", "query": "How many food item is shown in the bar graph?", "label": "14"},
        {"imgname": "multi_col_20396.png", "query": "What is the difference between the highest and lowest value?", "label": "0.57"},
    ])
    write_json(root / "test_augmented.json", [
        {"imgname": "two_col_1000.png", "query": "What was the revenue in 2019?", "label": "2.5"},
    ])
    for seed, name in enumerate(["41699051005347.png", "multi_col_20396.png", "two_col_1000.png"]):
        save_image(root / "png" / name, 50 + seed)


def make_textvqa() -> None:
    root = HERE / "textvqa"

    def question(question_id: int, image_id: str, text: str, answers: list[str]) -> dict:
        return {"question": text, "image_id": image_id, "image_classes": ["Poster"], "flickr_original_url": "",
                "flickr_300k_url": "", "image_width": SIZE, "image_height": SIZE, "answers": answers,
                "question_tokens": text.rstrip("?").split(), "question_id": question_id, "set_name": "val"}

    data = [
        question(34602, "003a8ae2ef43b901", "what is the brand of this camera?",
                 ["nous les gosses", "dakota", "clos culombu", "dakota digital", "dakota", "dakota", "dakota digital",
                  "dakota digital", "dakota", "dakota"]),
        question(34603, "004e2cabc1b3fa4e", "what does the small white text spell?",
                 ["copenhagen", "copenhagen", "copenhagen", "copenhagen", "thursday", "copenhagen", "copenhagen",
                  "copenhagen", "copenhagen", "copenhagen"]),
    ]
    write_json(root / "TextVQA_0.5.1_val.json",
               {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data})
    save_image(root / "train_images" / "003a8ae2ef43b901.jpg", 60)
    save_image(root / "train_images" / "004e2cabc1b3fa4e.jpg", 61)


def make_world() -> None:
    root = HERE / "world"
    write_jsonl(root / "test.jsonl", [
        {"id": "world-0000", "image": "0000.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat shape is left of the red circle?"},
            {"from": "gpt", "value": "A blue square."}]},
        {"id": "world-0001", "image": "extra/0001.png", "conversations": [
            {"from": "human", "value": "How many triangles are there?\n<image>"},
            {"from": "gpt", "value": "Three."}]},
    ])
    save_image(root / "images" / "0000.png", 70)  # found through root/images/<image>
    save_image(root / "extra" / "0001.png", 71)  # found through root/<image>


def make_llava_generic() -> None:
    root = HERE / "llava_generic"
    write_json(root / "conversations.json", [
        {"id": "custom-a", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the picture."},
            {"from": "gpt", "value": "A small gradient."},
            {"from": "human", "value": "What colour dominates?"},
            {"from": "gpt", "value": "Green."}]},
        {"id": "custom-text", "conversations": [
            {"from": "human", "value": "A text-only turn."}, {"from": "gpt", "value": "Left out."}]},
        {"id": "custom-b", "image": "b.png", "conversations": [
            {"from": "human", "value": "Is it bright?\n<image>"}, {"from": "gpt", "value": "Yes."}]},
    ])
    save_image(root / "images" / "a.png", 80)
    save_image(root / "images" / "b.png", 81)


if __name__ == "__main__":
    for make in (make_coco, make_gqa, make_llava_bench, make_mmmu, make_scienceqa, make_chartqa, make_textvqa,
                 make_world, make_llava_generic):
        make()
    print(f"wrote tiny benchmarks under {HERE}")
