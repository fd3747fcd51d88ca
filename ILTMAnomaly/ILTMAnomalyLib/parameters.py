"""Binding the panel's widgets to the typed parameter node, with a tag that disconnects them on every Slicer.

Slicer's ``parameterNodeWrapper`` offers ``connectGui(gui)``, but before Slicer 5.10 (commit b5a65a49a0) it
returns ``None`` instead of the connection's tag, so ``disconnectGui(None)`` silently does nothing and every
``enter()`` of the module adds one more set of widget connections. ``connectParametersToGui(mapping)`` has
returned the tag on every version (5.6, 5.8, 5.10 and later), and ``connectGui`` is only a search for widgets
with a ``SlicerParameterName`` property followed by that call; :func:`connect_gui` does the same search itself.

No Qt import: the widgets are only asked for their ``property``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

PARAMETER_NAME_PROPERTY = "SlicerParameterName"  # slicer.parameterNodeWrapper's SlicerParameterNamePropertyName


def parameter_widgets(ui) -> Dict[str, Any]:
    """``SlicerParameterName`` -> widget, over the attributes of ``ui`` (``slicer.util.childWidgetVariables``)."""
    widgets = {}
    for widget in vars(ui).values():
        get_property = getattr(widget, "property", None)
        name = get_property(PARAMETER_NAME_PROPERTY) if callable(get_property) else None
        if name:
            widgets[str(name)] = widget
    return widgets


def connect_gui(parameter_node, ui) -> Optional[int]:
    """Connect every bound widget of ``ui`` to ``parameter_node``; returns the tag :func:`disconnect_gui` needs."""
    return parameter_node.connectParametersToGui(parameter_widgets(ui))


def disconnect_gui(parameter_node, tag) -> None:
    if parameter_node is not None and tag is not None:
        parameter_node.disconnectGui(tag)
