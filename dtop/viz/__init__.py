"""Pictures of DToP: colour maps, the supplement's figures, the HTML report page. viz only draws: it takes
arrays and numbers and runs no model (the applications, :mod:`dtop.apps`, compute what it shows)."""
from .colors import colorize, colorize_stages, overlay, stage_colours
from .figures import (Sample, class_legend, exit_map_figure, figure1, figure2, panel_aspect, present_classes,
                      shrink_png, sweep_plot)
from .html import fixed, percent, report_page

__all__ = ["colorize", "colorize_stages", "overlay", "stage_colours", "Sample", "exit_map_figure", "figure1",
           "figure2", "sweep_plot", "shrink_png", "report_page", "class_legend", "present_classes", "panel_aspect",
           "fixed", "percent"]
