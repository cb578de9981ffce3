"""The toy world and the toy models: what lets capfilt run end to end offline, on a laptop.

The world (a synthetic LAION: scenes with known content, noisy web captions, a misbehaving server):
  scenes.py     the scenes' vocabulary, their captions (true, web, annotators') and their pixels
  world.py      a world on disk: source Parquet, image files, routes, ground truth, annotated set
  server.py     serves a world's routes over HTTP on 127.0.0.1 (ingest's test and demo web)
  oracle.py     a curated run of the world's true captions (what perfect captions would give)

The toy preset's frozen models, trained from scratch on a world's pairs (BLIP-2 starts from
pretrained ones; offline there are none):
  preset.py     ToyPreset: their sizes and step counts
  training.py   in-memory pretraining through the trainer core (model/trainer.py)
  tokenizer.py  the Q-Former's BERT WordPiece tokenizer
  bert.py       the masked-LM BERT the Q-Former starts from
  clip.py       the open_clip CLIP (the frozen image encoder and the filter's CLIP)
  lm.py         the OPT-style causal LM of Stage 2, with its byte-level BPE tokenizer
  stage1.py     (optional) a Stage 1 pretrained on the pretraining world: the filter's start
  pretrain.py   all of them from an ingested run or a world, into one folder

Nothing here imports the stages: the world is the stages' input, the toy models load through
the same calls as real ones (model/qformer.py, model/scorers.py, model/vision.py, transformers).
"""
