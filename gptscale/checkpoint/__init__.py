"""Checkpoint I/O, independent of the training runtime: the on-disk layout of every run mode
(layout), the save/resume protocol (resume), any checkpoint read as canonical tensors (read),
canonical weights in and out of live parameters (weights)."""
