"""Dataset readers (STEGO layouts, plain folder) and STEGO's crop geometry."""
import numpy as np
import pytest
from PIL import Image

from omh_ref.extract import datasets
from omh_ref.extract.images import crop_box, five_crops, resize_short, stego_crop
from omh_ref.core.errors import InputError

from tests import layouts


# ---- geometry: torchvision's Resize(int) + CenterCrop + five_crop rules -----------------------------
@pytest.mark.parametrize("size,res,want", [
    ((640, 480), 224, (298, 224)),    # long side int(224 * 640 / 480) = int(298.67) = 298, not 299
    ((480, 640), 224, (224, 298)),
    ((500, 375), 320, (426, 320)),    # int(426.67)
    ((224, 224), 224, (224, 224)),
    ((100, 300), 224, (224, 672)),    # upscaling too
])
def test_resize_short_truncates_the_long_side_as_torchvision(size, res, want):
    assert resize_short(Image.new("RGB", size), res).size == want


def test_centre_crop_rounds_half_to_even_as_torchvision():
    # torchvision: crop_left = int(round((W - cw) / 2.0)); Python rounds 37.5 -> 38, 36.5 -> 36
    assert crop_box((299, 224), (224, 224)) == (38, 0, 262, 224)
    assert crop_box((297, 224), (224, 224)) == (36, 0, 260, 224)
    assert crop_box((224, 299), (224, 224)) == (0, 38, 224, 262)
    arr = np.arange(224 * 299, dtype=np.int32).reshape(224, 299)
    out = np.asarray(stego_crop(Image.fromarray(arr), 224))
    assert out.shape == (224, 224) and (out == arr[:, 38:262]).all()


def test_stego_crop_resizes_with_nearest_then_crops():
    arr = np.arange(6 * 9, dtype=np.uint8).reshape(6, 9)   # H=6, W=9 -> short side 3: 3 x 4 (int(4.5))
    out = np.asarray(stego_crop(Image.fromarray(arr), 3))
    nearest = np.asarray(Image.fromarray(arr).resize((4, 3), Image.NEAREST))
    assert out.shape == (3, 3) and (out == nearest[:, 0:3]).all()    # left = round(0.5) = 0
    assert set(np.unique(out)) <= set(np.unique(arr))                 # NEAREST invents no values


def test_five_crops_order_and_size():
    arr = np.arange(7 * 10, dtype=np.int32).reshape(7, 10)  # crop 3 x 5 (int(3.5), int(5))
    tl, tr, bl, br, c = (np.asarray(x) for x in five_crops(Image.fromarray(arr), 0.5))
    assert (tl == arr[0:3, 0:5]).all() and (tr == arr[0:3, 5:10]).all()
    assert (bl == arr[4:7, 0:5]).all() and (br == arr[4:7, 5:10]).all()
    assert (c == arr[2:5, 2:7]).all()        # top = round(2.0), left = round(2.5) = 2


# ---- readers -----------------------------------------------------------------------------------------
def test_cocostuff27_reader_and_coarse_map(tmp_path):
    truth = layouts.coco(tmp_path, "val", n=3)
    ds = datasets.open_dataset("cocostuff27", tmp_path, "val")   # STEGO's data dir: cocostuff/ inside
    assert ds.root == tmp_path / "cocostuff" and ds.n_classes == 27 and len(ds.class_names) == 27
    assert [it.name for it in ds.items] == list(truth)            # the curated list's order
    assert len(datasets.COCO_FINE_TO_COARSE) == 182
    rgb, lab = ds.load(ds.items[1])
    want_rgb, raw = truth[ds.items[1].name]
    assert (np.asarray(rgb) == want_rgb).all() and (np.asarray(lab) == raw).all()
    lut = ds.map_labels(np.array([0, 1, 9, 91, 105, 181, 255, 182, 200], np.uint8))
    # person 0 -> 9, bicycle 1 -> 11 (vehicle), traffic light 9 -> 8 (outdoor), 91 -> 17, 105 -> 23 (sky),
    # 181 -> 24; 255 and ids no class maps to -> ignore
    assert lut.tolist() == [9, 11, 8, 17, 23, 24, 255, 255, 255]
    # the same folder given directly works too
    assert len(datasets.cocostuff27(tmp_path / "cocostuff", "val")) == 3


def test_cityscapes27_reader_sorted_and_label_shift(tmp_path):
    truth = layouts.cityscapes(tmp_path, "val")
    ds = datasets.open_dataset("cityscapes27", tmp_path / "cityscapes", "val")
    assert [it.name for it in ds.items] == sorted(truth)          # aachen first, then zurich sorted
    assert all(it.label.name.endswith("_gtFine_labelIds.png") for it in ds.items)
    lut = ds.map_labels(np.array([0, 6, 7, 8, 26, 33, 34], np.uint8))
    assert lut.tolist() == [255, 255, 0, 1, 19, 26, 255]


@pytest.mark.parametrize("float_images", [False, True])
def test_potsdam3_reader_mat_files(tmp_path, float_images):
    truth = layouts.potsdam(tmp_path, "train", float_images=float_images)
    ds = datasets.open_dataset("potsdam3", tmp_path, "train")
    assert [it.name for it in ds.items] == list(truth) and ds.n_classes == 3
    for it in ds.items:
        rgb, lab = ds.load(it)
        assert rgb.mode == "RGB" and (np.asarray(rgb) == truth[it.name][0]).all()   # IR channel dropped
        assert (np.asarray(lab) == truth[it.name][1]).all()
    assert ds.map_labels(np.array([0, 4, 1, 5, 2, 3, 255], np.uint8)).tolist() == [0, 0, 1, 1, 2, 2, 255]
    with pytest.raises(InputError, match="labelled_test.txt: no such file"):
        datasets.open_dataset("potsdam3", tmp_path, "val")


def test_folder_reader(tmp_path):
    truth = layouts.folder(tmp_path, n=5)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    ds = datasets.folder(tmp_path / "images", tmp_path / "labels")
    assert [it.name for it in ds.items] == sorted(truth) and ds.has_labels
    assert (ds.map_labels(np.arange(256, dtype=np.uint8)) == np.arange(256)).all()   # values kept
    no_labels = datasets.folder(tmp_path / "images")
    assert not no_labels.has_labels and no_labels.n_classes is None
    (tmp_path / "labels" / "img2.png").unlink()
    with pytest.raises(InputError, match=r"labels/img2.png: no such file \(expected the label map of image"):
        datasets.folder(tmp_path / "images", tmp_path / "labels")


def test_palette_label_maps_give_indices_not_colours(tmp_path):
    raw = np.array([[0, 1], [2, 255]], np.uint8)
    im = Image.fromarray(raw, "P")
    im.putpalette([200, 10, 10] * 256)       # every index the same colour
    im.save(tmp_path / "p.png")
    assert (np.asarray(datasets._read_pil(tmp_path / "p.png", "L")) == raw).all()


def test_reader_errors_name_the_path(tmp_path):
    with pytest.raises(InputError, match=r"nowhere: no such folder"):
        datasets.open_dataset("cityscapes27", tmp_path / "nowhere", "val")
    with pytest.raises(InputError, match=r"val2017/Coco164kFull_Stuff_Coarse_7.txt: no such file"):
        datasets.open_dataset("cocostuff27", tmp_path, "val")
    with pytest.raises(InputError, match=r"train2017/Coco164kFull_Stuff_Coarse.txt: no such file"):   # STEGO's lists
        datasets.open_dataset("cocostuff27", tmp_path, "train")
    with pytest.raises(InputError, match=r"--dataset: unknown data set 'voc'"):
        datasets.open_dataset("voc", tmp_path, "val")
    with pytest.raises(InputError, match=r"--split: expected one of train, val"):
        datasets.open_dataset("potsdam3", tmp_path, "test")
    (tmp_path / "cityscapes" / "leftImg8bit" / "val").mkdir(parents=True)
    with pytest.raises(InputError, match=r"no images found \(expected cityscapes27 split 'val'\)"):
        datasets.open_dataset("cityscapes27", tmp_path, "val")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no images found \(expected an image \(.jpg"):
        datasets.folder(tmp_path / "empty")


def test_unreadable_files_raise_image_error(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(datasets.ImageError, match=r"bad.jpg: cannot read image"):
        datasets._read_pil(tmp_path / "bad.jpg", "RGB")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(datasets.ImageError, match=r"rgb.png: a label map must be a single-channel image"):
        datasets._read_pil(tmp_path / "rgb.png", "L")
    # a truncated JPEG is caught when decoded, not later
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(datasets.ImageError, match=r"t.jpg: cannot read image"):
        datasets._read_pil(tmp_path / "t.jpg", "RGB")
    from scipy.io import savemat
    savemat(tmp_path / "x.mat", {"other": np.zeros((2, 2))})
    with pytest.raises(datasets.ImageError, match=r"x.mat: no 'img' array in the .mat file \(keys: \['other'\]\)"):
        datasets._read_mat(tmp_path / "x.mat", "img")


@pytest.mark.parametrize("img,gt,msg", [
    (np.full((4, 4, 3), 200.0), None, r"a float64 'img' must hold values in \[0, 1\], got \[200.0, 200.0\]"),
    (np.full((4, 4, 3), 999, np.uint16), None, r"a uint16 'img' must hold values in \[0, 255\], got \[999, 999\]"),
    (np.full((4, 4, 3), np.nan), None, r"'img' holds NaN or inf"),
    (None, np.full((4, 4), 2.7), r"label values must be whole numbers"),
    (None, np.full((4, 4), np.nan), r"label values must be whole numbers"),
    (None, np.full((4, 4), 300, np.uint16), r"label values must lie in \[0, 255\], got \[300, 300\]"),
])
def test_potsdam_mat_contents_are_checked(tmp_path, img, gt, msg):
    """Values torchvision would wrap or truncate into garbage are refused, naming the file."""
    from scipy.io import savemat

    layouts.potsdam(tmp_path, "val", n=1)
    ds = datasets.open_dataset("potsdam3", tmp_path, "val")
    it = ds.items[0]
    if img is not None:
        savemat(it.image, {"img": img})
    if gt is not None:
        savemat(it.label, {"gt": gt})
        savemat(it.image, {"img": np.zeros((4, 4, 3), np.uint8)})
    with pytest.raises(datasets.ImageError, match=msg):
        ds.load(it)


def test_mat_cell_array_and_16_bit_label_png_are_image_errors(tmp_path):
    from scipy.io import savemat

    cell = np.empty((4, 4, 3), dtype=object)     # a cell array of the right shape: not numbers
    for i in np.ndindex(cell.shape):
        cell[i] = np.zeros(2)
    savemat(tmp_path / "cell.mat", {"img": cell})
    with pytest.raises(datasets.ImageError, match=r"cell.mat: expected a numeric 'img' array, got dtype object"):
        datasets.read_mat_rgb(tmp_path / "cell.mat")
    Image.fromarray(np.full((4, 4), 300, np.uint16)).save(tmp_path / "l16.png")
    with pytest.raises(datasets.ImageError, match=r"l16.png: label values must lie in \[0, 255\], got \[300, 300\]"):
        datasets._read_pil(tmp_path / "l16.png", "L")


def test_folder_reports_a_broken_link_and_names_a_file_root(tmp_path):
    layouts.folder(tmp_path, n=2, labels=False, nested=False)
    (tmp_path / "images" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    ds = datasets.folder(tmp_path / "images")
    assert [it.name for it in ds.items] == ["gone.png", "img0.png", "img1.png"]
    with pytest.raises(datasets.ImageError, match=r"gone.png: no such file"):
        ds.load(ds.items[0])
    with pytest.raises(InputError, match=r"img0.png: not a folder \(expected --images"):
        datasets.folder(tmp_path / "images" / "img0.png")
    with pytest.raises(InputError, match=r"img0.png: not a folder \(expected --root"):
        datasets.open_dataset("potsdam3", tmp_path / "images" / "img0.png", "val")
