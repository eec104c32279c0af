"""Slicer glue of the DualNet extension, importable without a running Slicer.

Nothing in this package imports ``qt``, ``ctk`` or the Slicer application at module level:
MRML nodes are handled through their own methods and ``vtk``, so the same functions run inside
Slicer and, with the ``slicer-core`` wheel, in plain pytest. Heavy computation stays in the
``dualnet`` core package that ships beside this folder.

Modules:
    nodes        MRML volume node <-> ``dualnet.io.Volume`` (array order and RAS/LPS geometry).
    modality     guess the modality (MRI / CT / US) from a DICOM tag or the intensity range.
    process      child-process runner with a reader thread and progress-line parsing.
    worker       the child-process script: reads a JSON job, calls the core, prints progress.
    models       model store: shipped models plus a per-user folder with a JSON index.
    dependencies PyTorch via the PyTorch extension, pip for the rest after confirmation.
    cliargs      build an argparse parser from a Slicer CLI XML description.
    logic        the denoise / Dice logic on MRML nodes (no widgets, no dialogs).
"""
