"""Experiments that produce the figures in notes/finetune.md and the README (run as `python -m ...`).

- `domain_shift`: train a segmenter on one synthetic site, evaluate on all sites with and without the Chen pipeline.
- `sunnybrook_eval`: LV / MYO Dice and LV EF on Sunnybrook for a synthetic-trained and a Sunnybrook-trained model.
"""
