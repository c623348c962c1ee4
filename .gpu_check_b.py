import sys, numpy as np, torch
sys.path.insert(0, "tests")
from conftest import tiny_sam
from samlora.inference import automatic
from samlora.inference.segmenter import SegmentOptions
from samlora.models.instance_decoder import InstanceDecoder, attach
sam = tiny_sam("vit_t", 256).cuda()
torch.manual_seed(0); attach(sam, InstanceDecoder(256, 8, 256).eval())
img = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
ref = None
for precision in ("fp32", "bf16"):
    for mode in ("ais", "apg"):
        seg = automatic.build_segmenter(sam, SegmentOptions(mode=mode, tile_size=256, tile_overlap=64, precision=precision, write_maps=True, min_area=0, box_batch=64))
        labels, kept, maps = seg.segment(img)
        print(precision, mode, labels.shape, labels.max(), len(kept), maps.dtype, float(maps.min()), float(maps.max()))
    if ref is None: ref = maps
    else: print("bf16 vs fp32 max map diff", float(np.abs(maps - ref).max()))
