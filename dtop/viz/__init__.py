"""Pictures of DToP: colour maps, the supplement's figures, the HTML report."""
from .colors import colorize, colorize_stages, overlay, stage_colours
from .figures import exit_map_figure, figure1, figure2, sweep_plot
from .report import build_report, load_run

__all__ = ["colorize", "colorize_stages", "overlay", "stage_colours", "exit_map_figure", "figure1", "figure2",
           "sweep_plot", "build_report", "load_run"]
