/* The study page's image viewer: plain JavaScript served by the box (no CDN, no library).
 *
 * Each overlay thumbnail (button.open-viewer, data-overlay / data-original / data-name) opens the <dialog id="viewer">
 * full screen. Zoom 100 % .. 1600 % about the pointer, the pinch centre or the image centre; pan by drag (mouse, pen
 * or one finger) or the arrow keys; the AI overlay (the result Secondary Capture) on and off against the original
 * image the box received. Keys inside the viewer: + / - zoom, 0 fits, arrows pan, O toggles the overlay, Esc closes
 * (the dialog's own). The state is on the dialog for tests and assistive technology: data-scale, data-overlay,
 * the overlay button's aria-pressed and the image's alt text ("L CC with AI overlay" / "L CC original image").
 */
(() => {
  "use strict";
  const dialog = document.getElementById("viewer");
  if (!dialog || typeof dialog.showModal !== "function") return;
  const img = document.getElementById("viewer-img");
  const stage = document.getElementById("viewer-stage");
  const title = document.getElementById("viewer-title");
  const overlayButton = document.getElementById("viewer-overlay");
  const level = document.getElementById("viewer-zoom-level");
  const MIN = 1, MAX = 16, STEP = 1.25, PAN = 48;
  let current = null, opener = null, showOverlay = true;
  let scale = 1, x = 0, y = 0;
  const pointers = new Map();
  let pinchDistance = 0;

  function clamp() {
    const mx = (stage.clientWidth * (scale - 1)) / 2, my = (stage.clientHeight * (scale - 1)) / 2;
    x = Math.max(-mx, Math.min(mx, x));
    y = Math.max(-my, Math.min(my, y));
  }

  function apply() {
    clamp();
    img.style.transform = `translate(${x}px, ${y}px) scale(${scale})`;
    level.textContent = `${Math.round(scale * 100)}%`;
    dialog.dataset.scale = scale.toFixed(3);
  }

  /* zoom by ``factor`` about (cx, cy), in pixels from the stage's centre: that point stays under the finger */
  function zoom(factor, cx = 0, cy = 0) {
    const next = Math.min(MAX, Math.max(MIN, scale * factor));
    const k = next / scale;
    x = cx - (cx - x) * k;
    y = cy - (cy - y) * k;
    scale = next;
    apply();
  }

  function fit() {
    scale = 1;
    x = 0;
    y = 0;
    apply();
  }

  function pan(dx, dy) {
    x += dx;
    y += dy;
    apply();
  }

  function show() {
    img.src = showOverlay ? current.overlay : current.original;
    img.alt = `${current.name} ${showOverlay ? "with AI overlay" : "original image, no overlay"}`;
    overlayButton.setAttribute("aria-pressed", String(showOverlay));
    overlayButton.textContent = showOverlay ? "AI overlay on" : "AI overlay off";
    dialog.dataset.overlay = showOverlay ? "on" : "off";
  }

  function toggleOverlay() {
    showOverlay = !showOverlay;
    show();
  }

  function open(button) {
    opener = button;
    current = { overlay: button.dataset.overlay, original: button.dataset.original, name: button.dataset.name };
    title.textContent = `${current.name} · ${button.dataset.bundle || ""}`.trim();
    showOverlay = true;
    show();
    dialog.showModal();
    fit();
    stage.focus();
  }

  function centred(clientX, clientY) {
    const r = stage.getBoundingClientRect();
    return [clientX - r.left - r.width / 2, clientY - r.top - r.height / 2];
  }

  document.querySelectorAll("button.open-viewer").forEach((b) => b.addEventListener("click", () => open(b)));
  document.getElementById("viewer-zoom-in").addEventListener("click", () => zoom(STEP));
  document.getElementById("viewer-zoom-out").addEventListener("click", () => zoom(1 / STEP));
  document.getElementById("viewer-reset").addEventListener("click", fit);
  overlayButton.addEventListener("click", toggleOverlay);
  document.getElementById("viewer-close").addEventListener("click", () => dialog.close());
  dialog.addEventListener("close", () => {
    img.removeAttribute("src");
    if (opener) opener.focus();
  });
  img.addEventListener("error", () => {
    if (current && img.getAttribute("src")) img.alt = `${current.name}: image not available (purged or unreadable)`;
  });

  dialog.addEventListener("keydown", (e) => {
    if (e.altKey || e.ctrlKey || e.metaKey) return;
    switch (e.key) {
      case "+": case "=": zoom(STEP); break;
      case "-": case "_": zoom(1 / STEP); break;
      case "0": fit(); break;
      case "o": case "O": toggleOverlay(); break;
      case "ArrowLeft": pan(PAN, 0); break;
      case "ArrowRight": pan(-PAN, 0); break;
      case "ArrowUp": pan(0, PAN); break;
      case "ArrowDown": pan(0, -PAN); break;
      default: return;
    }
    e.preventDefault();
  });

  stage.addEventListener("wheel", (e) => {
    e.preventDefault();
    zoom(e.deltaY < 0 ? STEP : 1 / STEP, ...centred(e.clientX, e.clientY));
  }, { passive: false });

  stage.addEventListener("pointerdown", (e) => {
    stage.setPointerCapture(e.pointerId);
    pointers.set(e.pointerId, [e.clientX, e.clientY]);
    if (pointers.size === 2) {
      const [a, b] = [...pointers.values()];
      pinchDistance = Math.hypot(a[0] - b[0], a[1] - b[1]);
    }
  });
  stage.addEventListener("pointermove", (e) => {
    const last = pointers.get(e.pointerId);
    if (!last) return;
    if (pointers.size === 1) {
      pan(e.clientX - last[0], e.clientY - last[1]);
    } else if (pointers.size === 2) {
      pointers.set(e.pointerId, [e.clientX, e.clientY]);
      const [a, b] = [...pointers.values()];
      const distance = Math.hypot(a[0] - b[0], a[1] - b[1]);
      if (pinchDistance > 0) zoom(distance / pinchDistance, ...centred((a[0] + b[0]) / 2, (a[1] + b[1]) / 2));
      pinchDistance = distance;
      return;
    }
    pointers.set(e.pointerId, [e.clientX, e.clientY]);
  });
  const release = (e) => {
    pointers.delete(e.pointerId);
    pinchDistance = 0;
  };
  stage.addEventListener("pointerup", release);
  stage.addEventListener("pointercancel", release);
  stage.addEventListener("dblclick", (e) => zoom(scale >= MAX ? 1 / MAX : 2, ...centred(e.clientX, e.clientY)));
  window.addEventListener("resize", () => dialog.open && apply());
})();
