"""An ImageFolder whose held-out split is named test/ (CIFAR-10's JPEG copies) reads like one
with val/; both at once is refused with one sentence."""

import os

import pytest

from mpl_fast.data.imagefolder import load_imagefolder
from mpl_fast.data.tiny import write_tiny_imagefolder


def test_test_folder_is_the_held_out_split_like_val(tmp_path):
    root = write_tiny_imagefolder(str(tmp_path / "a"), num_classes=3, train_per_class=4, val_per_class=2,
                                  bad_files=False)
    with_val = load_imagefolder(root)
    os.rename(os.path.join(root, "val"), os.path.join(root, "test"))
    with_test = load_imagefolder(root)
    assert [os.path.relpath(p, root).split(os.sep, 1)[1] for p in with_test.test.images] == \
           [os.path.relpath(p, root).split(os.sep, 1)[1] for p in with_val.test.images]
    assert list(with_test.test.labels) == list(with_val.test.labels) and len(with_test.test) == 6
    assert all(os.sep + "test" + os.sep in p for p in with_test.test.images)


def test_val_and_test_together_are_refused(tmp_path):
    root = write_tiny_imagefolder(str(tmp_path / "b"), num_classes=2, train_per_class=2, val_per_class=1,
                                  bad_files=False)
    os.makedirs(os.path.join(root, "test", "x"))
    with pytest.raises(ValueError, match="both val/ and test/"):
        load_imagefolder(root)


def test_no_held_out_folder_names_both_choices(tmp_path):
    root = write_tiny_imagefolder(str(tmp_path / "c"), num_classes=2, train_per_class=2, val_per_class=1,
                                  bad_files=False)
    os.rename(os.path.join(root, "val"), os.path.join(root, "held"))
    with pytest.raises(FileNotFoundError, match=r"val/ \(test/\) is missing"):
        load_imagefolder(root)
