// The review page's image viewer: heatmap layers per finding, method, opacity, boxes,
// window/level presets and zoom. Everything else on the page works without JavaScript.
"use strict";
(function () {
  function setup(viewer) {
    const width = Number(viewer.dataset.width);
    const canvas = viewer.querySelector(".canvas");
    const stage = viewer.querySelector(".stage");
    const base = viewer.querySelector("img.base");
    const boxes = viewer.querySelector("svg.boxes");
    const zoomLabel = viewer.querySelector(".zoom-level");
    let zoom = null; // null: fit to the stage

    function method() {
      const checked = viewer.querySelector("input.method:checked");
      return checked ? checked.value : "";
    }
    function opacity() {
      return Number(viewer.querySelector("input.opacity").value) / 100;
    }
    function refresh() {
      const on = new Set();
      viewer.querySelectorAll("input.layer-toggle:checked").forEach((b) => on.add(b.dataset.finding));
      viewer.querySelectorAll("img.layer").forEach((img) => {
        const show = on.has(img.dataset.finding) && img.dataset.method === method();
        if (show && !img.getAttribute("src")) img.setAttribute("src", img.dataset.src);
        img.hidden = !show;
        img.style.opacity = String(opacity());
      });
      viewer.querySelectorAll("svg.boxes g").forEach((g) => {
        const show = on.has(g.dataset.finding) && g.dataset.method === method();
        if (show) g.removeAttribute("hidden"); else g.setAttribute("hidden", "");
      });
      boxes.classList.toggle("off", !viewer.querySelector("input.boxes-toggle").checked);
    }
    function applyZoom() {
      if (zoom === null) {
        canvas.style.width = "";
        canvas.style.maxWidth = "100%";
        zoomLabel.textContent = "fit";
      } else {
        canvas.style.maxWidth = "none";
        canvas.style.width = Math.round(width * zoom) + "px";
        zoomLabel.textContent = Math.round(zoom * 100) + "%";
      }
    }
    function fitScale() {
      return Math.min(1, stage.clientWidth / width);
    }
    function step(factor) {
      const current = zoom === null ? fitScale() : zoom;
      zoom = Math.min(8, Math.max(0.1, current * factor));
      applyZoom();
    }
    viewer.querySelectorAll("input.layer-toggle, input.method, input.opacity, input.boxes-toggle")
      .forEach((el) => el.addEventListener("input", refresh));
    viewer.querySelectorAll("input.layer-toggle, input.method, input.boxes-toggle")
      .forEach((el) => el.addEventListener("change", refresh));
    const preset = viewer.querySelector("select.preset");
    if (preset && base) {
      preset.addEventListener("change", () => {
        const url = new URL(base.getAttribute("src"), window.location.href);
        url.searchParams.set("preset", preset.value);
        base.setAttribute("src", url.pathname + url.search);
      });
    }
    viewer.querySelector(".zoom-in").addEventListener("click", () => step(1.25));
    viewer.querySelector(".zoom-out").addEventListener("click", () => step(0.8));
    viewer.querySelector(".zoom-fit").addEventListener("click", () => { zoom = null; applyZoom(); });
    viewer.querySelector(".zoom-full").addEventListener("click", () => { zoom = 1; applyZoom(); });
    stage.addEventListener("keydown", (event) => {
      const pan = 60;
      if (event.key === "+" || event.key === "=") step(1.25);
      else if (event.key === "-") step(0.8);
      else if (event.key === "0") { zoom = null; applyZoom(); }
      else if (event.key === "1") { zoom = 1; applyZoom(); }
      else if (event.key === "ArrowLeft") stage.scrollLeft -= pan;
      else if (event.key === "ArrowRight") stage.scrollLeft += pan;
      else if (event.key === "ArrowUp") stage.scrollTop -= pan;
      else if (event.key === "ArrowDown") stage.scrollTop += pan;
      else return;
      event.preventDefault();
    });
    applyZoom();
    refresh();
  }
  document.querySelectorAll("figure.viewer").forEach(setup);
})();
