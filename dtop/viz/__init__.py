"""Pictures of DToP: colour maps, the supplement's figures, the HTML report page. viz only draws: it takes
arrays and numbers and runs no model (the applications, :mod:`dtop.apps`, compute what it shows)."""
from .colors import colorize, colorize_stages, overlay, stage_colours
from .figures import Sample, exit_map_figure, figure1, figure2, shrink_png, sweep_plot
from .html import report_page

__all__ = ["colorize", "colorize_stages", "overlay", "stage_colours", "Sample", "exit_map_figure", "figure1",
           "figure2", "sweep_plot", "shrink_png", "report_page"]
