"""The parts of training, one job each; ``ssd_keras.train.Trainer`` puts them together.

- ``run_dir``  the run directory on disk: writable, locked (``ssd_keras/run_lock.py``),
               fresh or resumed, its leftovers
- ``state``    what a checkpoint holds (weights, EMA, optimizer, RNG, data position) and
               how it is saved and restored
- ``step``     one optimisation step on one Flexi-UNet path, and its data-parallel variant
- ``log``      the log window and the rows of ``log.csv``
- ``signals``  SIGINT/SIGTERM: stop cleanly after the step, or at once on a second signal
"""
