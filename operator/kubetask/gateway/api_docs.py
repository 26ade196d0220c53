"""`/docs`: the API browsable with Swagger UI, whose code is pinned by its hash.

FastAPI's own page loads `swagger-ui-dist@5` from a CDN: whatever that major version names on
the day, run in the gateway's origin, on a page where a user types their token (Authorize).
Whoever could change what the CDN serves would have had every token typed there. The page
here names one release and its files' SHA-384 (Subresource Integrity): a browser runs them only
if they are those bytes, and shows nothing otherwise. The hashes were taken from the npm
package itself (`npm pack swagger-ui-dist@5.35.0`, `openssl dgst -sha384 -binary | base64`),
whose files jsDelivr serves as published (not checked from the machine this was written on,
which cannot reach the CDN). FastAPI's ReDoc page (`/redoc`, also a floating version) and
its favicon from fastapi.tiangolo.com are not served. A machine that cannot reach the CDN shows
an empty page; `/openapi.json` is the same document either way.
"""

from __future__ import annotations

import html
import json

from fastapi.responses import HTMLResponse

RELEASE = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.35.0"
SCRIPT = (
    f"{RELEASE}/swagger-ui-bundle.js",
    "sha384-gjRm0bEPMeTmMh5jT2cHccIwCUZSTd8YC+j0d0sXw0MdGEfScduGpSyF3ZSSLkX9",
)
STYLE = (
    f"{RELEASE}/swagger-ui.css",
    "sha384-WlYgdmXYOOBWL5apwjDEZwN+U3HmXSSu5R6V5aGxEcf7z+KuRNwBhoxKVN1i3D5I",
)


def page(title: str, openapi_url: str) -> HTMLResponse:
    (script, script_hash), (style, style_hash) = SCRIPT, STYLE
    return HTMLResponse(
        f"""<!DOCTYPE html>
<html>
<head>
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<link rel="stylesheet" href="{style}" integrity="{style_hash}" crossorigin="anonymous">
<title>{html.escape(title)}</title>
</head>
<body>
<div id="swagger-ui"></div>
<script src="{script}" integrity="{script_hash}" crossorigin="anonymous"></script>
<script>
SwaggerUIBundle({{
  url: {json.dumps(openapi_url)},
  dom_id: "#swagger-ui",
  deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
}})
</script>
</body>
</html>
""",
        headers={"Referrer-Policy": "no-referrer"},
    )
