"""Built-in class names of the STEGO benchmarks (the order of their label indices)."""

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
