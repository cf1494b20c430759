"""toy/: the offline toy worlds standing in for CLIP's weights and the datasets (docs/toy-world.md).
world.py draws a world and its scenes; prepare.py writes one to data/toyN (nanoGPT's
data/*/prepare.py way): the scenes, a tiny CLIP trained on their captions, a toy ImageNet ResNet-18.
"""
