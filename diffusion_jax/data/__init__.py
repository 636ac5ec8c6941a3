"""Datasets and input pipelines.

  shapes       procedural scenes, antialiased renderer, caption grammar and parser (numpy + PIL)
  shapes_tfds  the TFDS builder `shapes/<res>px_<n>[_max<k>][_small|_large][_seed<s>]`
               and prepare_shapes()
  real_tfds    TFDS builders of real sets that install offline: fashion_mnist_offline,
               mnist5k, noto_emoji (readers: labelled_sources, emoji)
  pipeline     InputPipeline: any array_record TFDS dataset through tfds.data_source + grain
  parallel     ordered map over worker subprocesses (dataset preparation)
  multihost    prepare_once(): process 0 prepares, the other processes wait, then reuse it

Submodules are not imported here: TFDS takes seconds to import and the renderer needs none of it.
"""
