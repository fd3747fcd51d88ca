"""MRML glue between the ILTMAnomaly panel and the ``iltm`` core.

Everything here imports ``slicer`` (MRML, module logics, storage nodes), ``vtk`` and ``numpy``, and never
``qt``, ``ctk`` or ``slicer.qMRML*``: the same code runs inside 3D Slicer and on the ``slicer-core`` wheel,
which is how the tests in ``Testing/slicer`` exercise it. Long work (training, detection) never runs in this
process; :mod:`ILTMAnomalyLib.jobs` starts the ``iltm`` command line in a child process and reads its
progress lines.

Modules:
    volumes: volume node <-> numpy array with geometry; volume files through storage nodes.
    overlay: score overlay in the slice views (PET-Heat colours, opacity, window) and the live binary map.
    segments: binary map -> segmentation, per-component statistics, ``.seg.nrrd`` export.
    runs: a training run folder read for the iteration browser and its history plot.
    jobs: the background ``iltm`` process and its JSON-lines progress protocol.
    workflow: detection and training as the panel runs them: checks, command lines, loading results.
    dependencies: what the core needs and installing it on first use (never at import).
    parameters: the panel's widgets bound to the parameter node with a tag that disconnects on Slicer 5.8 too.
    rendering: off-screen slice rendering through vtkMRMLSliceLogic (tests, screenshots).
"""

class PanelError(Exception):
    """A problem the user can act on (wrong input, incomplete run folder, failed job), shown as is in the panel.

    Raising it never leaves half-made nodes behind: functions here create their nodes only after the work that
    could fail has succeeded, and remove what they added when something fails after all.
    """
