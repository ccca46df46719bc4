"""`python -m stages plots_page`: the HTML page `dvc plots show` fills, with Vega, Vega-Lite and
Vega-Embed inlined, so the plots render offline (DVC's default page loads them from a CDN).

The JavaScript comes from the vl-convert-python package (`vl_convert.javascript_bundle()`,
bundled in its wheel: nothing is downloaded). Written to data/plots_offline.html by the DVC
stage `plots_page` (so a plain `dvc repro` makes it), which .dvc/config names as
`plots.html_template`."""

import sys

from cmkd.pipeline.layout import PLOTS_PAGE
from cmkd.utils.atomic import write_text
from stages._common import main, parser

PAGE = PLOTS_PAGE

# DVC's own page (dvc_render.html.PAGE_HTML) with the scripts inlined instead of `{scripts}`.
TEMPLATE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <script>
%s
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def offline_page() -> str:
    """The page, with the bundle made safe to sit inside a <script> element."""
    import vl_convert

    bundle = vl_convert.javascript_bundle().replace("</script", "<\\/script")
    for placeholder in ("{plot_divs}", "{scripts}", "{refresh_tag}"):
        if placeholder in bundle:  # DVC substitutes these anywhere in the page
            raise RuntimeError(f"the Vega bundle contains DVC's placeholder {placeholder}")
    return TEMPLATE % bundle


def run() -> None:
    p = parser(__doc__)
    p.add_argument("--out", default=str(PAGE), help=f"where to write the page (default {PAGE})")
    args = p.parse_args()
    write_text(args.out, offline_page())
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main(run)
