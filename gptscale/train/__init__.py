"""The training loop, the same for every run mode and task (loop), the task seam (tasks), and
what the loop uses: batches, metrics, the closing sample."""
