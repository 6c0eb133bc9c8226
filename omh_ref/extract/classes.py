"""Built-in class names of the STEGO benchmarks (the order of their label indices), and of the
finer and coarser granularities of their label hierarchies (``extract.datasets.label_hierarchy``)."""

CLASS_NAMES = {
    "cocostuff27": [
        "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal",
        "outdoor", "person", "sports", "vehicle", "ceiling", "floor", "food-stuff", "furniture-stuff",
        "rawmaterial", "textile", "wall", "window", "building", "ground", "plant", "sky", "solid",
        "structural", "water"],
    "cityscapes27": [
        "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
        "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
        "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
        "motorcycle", "bicycle"],
    "potsdam3": ["roads and cars", "buildings and clutter", "trees and vegetation"],
}

# COCO-Stuff's 182 fine labels, by the id its annotation PNGs store (0 = person ... 181 = wood; 255
# unlabelled): the label list of the COCO-Stuff release (nightrome/cocostuff, labels.md, whose
# ids are these plus 1). Eleven thing ids (street sign, hat, shoe, ...) were removed from COCO and
# never occur.
COCO_FINE_NAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "hat", "backpack", "umbrella", "shoe", "eye glasses",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk",
    "toilet", "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "blender", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush", "hair brush", "banner", "blanket", "branch", "bridge", "building-other", "bush",
    "cabinet", "cage", "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit",
    "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves", "light", "mat", "metal",
    "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other",
    "plastic", "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug",
    "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone",
    "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick",
    "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "waterdrops", "window-blind", "window-other", "wood"]

# COCO-Stuff-27's classes 0-11 are the thing supercategories, 12-26 the stuff ones (STEGO's order).
COCO_THINGS_STUFF = [0] * 12 + [1] * 15
COCO_THINGS_STUFF_NAMES = ["things", "stuff"]

# The Cityscapes category of each of the 27 classes (labelIds 7-33) of STEGO's 27-class setting, as
# cityscapesScripts defines them (mcordts/cityscapesScripts, cityscapesscripts/helpers/labels.py,
# the `category` / `catId` columns). Of its 8 categories, void holds none of the 27 classes, so the
# classes fall into 7: our category id is catId - 1.
CITYSCAPES_CATEGORY_NAMES = ["flat", "construction", "object", "nature", "sky", "human", "vehicle"]
CITYSCAPES_CATEGORY = [
    0, 0, 0, 0,               # road, sidewalk, parking, rail track: flat
    1, 1, 1, 1, 1, 1,         # building, wall, fence, guard rail, bridge, tunnel: construction
    2, 2, 2, 2,               # pole, polegroup, traffic light, traffic sign: object
    3, 3,                     # vegetation, terrain: nature
    4,                        # sky
    5, 5,                     # person, rider: human
    6, 6, 6, 6, 6, 6, 6, 6]   # car, truck, bus, caravan, trailer, train, motorcycle, bicycle: vehicle

# Potsdam's 6 classes as IIC's ground truth numbers them (ISPRS order); potsdam3 merges them
# {0, 4} -> roads and cars, {1, 5} -> buildings and clutter, {2, 3} -> trees and vegetation.
POTSDAM_FINE_NAMES = ["roads", "buildings", "low vegetation", "trees", "cars", "clutter"]
