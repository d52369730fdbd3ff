"""Class names wherever class ids are accepted: matching rules, ImageNet's names, the errors."""
from __future__ import annotations

import pytest

from fvar_core.checks import parse_classes
from fvar_core.classnames import class_id, display_name, imagenet_names, names_for
from fvar_core.errors import UserError

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@pytest.mark.parametrize("text, want", [
    ("sneaker", 7), ("Sneaker", 7), ("SNEAKER", 7), ("ankle boot", 9), ("Ankle-Boot", 9), ("ankle_boot", 9),
    ("ankleboot", 9), ("t-shirt/top", 0), ("T-shirt", 0), ("top", 0), ("tshirt", 0), ("shirt", 6), ("bag", 8),
    ("pull", 2),  # a unique prefix
])
def test_names_match_ignoring_case_spaces_and_punctuation(text, want):
    assert class_id(text, FASHION) == want


def test_unknown_name_lists_the_closest_names_in_one_line():
    with pytest.raises(UserError) as e:
        class_id("sneakr", FASHION)
    msg = str(e.value)
    assert "\n" not in msg and "unknown class 'sneakr'" in msg and "Sneaker (7)" in msg
    with pytest.raises(UserError, match=r"unknown class 'zebra'; the classes are T-shirt/top, Trouser"):
        class_id("zebra", FASHION)


def test_an_ambiguous_prefix_names_the_candidates():
    with pytest.raises(UserError, match=r"'s' is ambiguous: Sandal \(5\), Shirt \(6\), Sneaker \(7\)"):
        class_id("s", FASHION)


def test_parse_classes_mixes_names_ids_ranges_and_uncond():
    assert parse_classes("sneaker,0-2,Ankle Boot,uncond", 10, FASHION) == [7, 0, 1, 2, 9, 10]
    assert parse_classes(["ankle boot", 3, "bag"], 10, FASHION) == [9, 3, 8]
    assert parse_classes(10, 10, FASHION) == [10]  # the Python API's unconditional id
    with pytest.raises(UserError, match="this model's classes have no names"):
        parse_classes("sneaker", 10, None)
    with pytest.raises(UserError, match="--class"):
        parse_classes("11", 10, FASHION)
    with pytest.raises(UserError, match="classes: unknown class 'boots'"):
        parse_classes(["boots"], 10, FASHION, where="classes")


def test_imagenet_names_ship_for_1000_class_models():
    names = imagenet_names()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert names[0] == "tench" and names[207] == "golden retriever" and names[388] == "giant panda"
    assert names_for(None, 1000) == names and names_for(None, 10) is None
    assert parse_classes("golden retriever,Giant Panda,tench", 1000, names) == [207, 388, 0]


def test_image_folder_names_read_as_names():
    folders = ["0-t-shirt-top", "1-trouser", "9-ankle-boot"]
    assert [display_name(n) for n in folders] == ["t shirt top", "trouser", "ankle boot"]
    assert names_for(folders, 3)[2] == "ankle boot" and class_id("ankle boot", names_for(folders, 3)) == 2
    assert display_name("T-shirt/top") == "T-shirt/top"
