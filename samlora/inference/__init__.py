"""Layer 4: segmenting images, tiles, YOLO boxes, volumes section by section, linking, propagation, dask."""
