"""Slides: the reader (the only place that imports openslide or tiffslide), pixel formats, tissue."""
