// /cloud/new, steps 2-4: plan and region from the catalog, the Room's name, goal and optional
// provider credentials, then checkout (Stripe) — or straight to provisioning when billing is
// disabled (development only).
"use strict";

(function () {
  const Q = window.Q;
  const form = document.getElementById("new-room-form");
  if (!form) return;
  const loading = document.getElementById("catalog-loading");
  // One key per visit of this page: a double click or a retried request creates one Room.
  const idempotencyKey = Q.uuid();

  function spec(tier) {
    const memory = tier.memoryMb >= 1024 ? `${tier.memoryMb / 1024} GB` : `${tier.memoryMb} MB`;
    const cpu = `${tier.cpus} ${tier.cpuKind === "performance" ? "performance" : "shared"} CPU${tier.cpus > 1 ? "s" : ""}`;
    return `${cpu} · ${memory} memory · ${tier.volumeGb} GB storage`;
  }

  function choiceCard(group, value, checked, ...lines) {
    const id = `${group}-${value}`;
    return Q.el(
      "label",
      { class: "choice-card", for: id },
      Q.el("input", {
        type: "radio",
        name: group,
        id,
        value,
        checked,
        required: true,
        "aria-describedby": `${group}-error`,
      }),
      ...lines
    );
  }

  function renderCatalog(catalog) {
    const tiers = document.getElementById("tier-cards");
    catalog.tiers.forEach((tier, index) => {
      tiers.append(
        choiceCard(
          "tier",
          tier.id,
          index === 0,
          Q.el("span", { class: "title", text: tier.name }),
          Q.el("span", {
            class: "price",
            text: `${Q.money(tier.monthlyPriceCents, tier.currency)} / month`,
          }),
          Q.el("span", { class: "spec", text: spec(tier) })
        )
      );
    });
    const regions = document.getElementById("region-cards");
    catalog.regions.forEach((region, index) => {
      regions.append(
        choiceCard(
          "region",
          region.id,
          index === 0,
          Q.el("span", { class: "title", text: region.name }),
          Q.el("span", { class: "spec", text: region.id })
        )
      );
    });
    const mode = document.getElementById("billing-mode");
    const button = document.getElementById("create-room");
    if (catalog.billingEnabled) {
      mode.textContent = "You will pay on Stripe's secure checkout page; cancel any time.";
      button.textContent = "Continue to payment";
    } else {
      mode.textContent = "Development: billing disabled";
      mode.classList.add("dev-badge");
      button.textContent = "Create Room";
    }
  }

  // Back from a canceled Stripe Checkout: remove the unpaid Room it was for, so an abandoned
  // checkout does not hold one of the person's instance slots. Only an instance still waiting
  // for payment is removed; one paid meanwhile (another tab) is left alone.
  const canceled = document.getElementById("checkout-canceled");
  const canceledId = canceled && canceled.dataset.instance;
  if (canceledId) {
    const path = `/api/cloud/instances/${encodeURIComponent(canceledId)}`;
    Q.api("GET", path, undefined, { noRedirect: true })
      .then((instance) => {
        if (instance.status === "awaiting_payment" || instance.status === "draft") {
          return Q.api("DELETE", path, undefined, { noRedirect: true });
        }
        return null;
      })
      .catch(() => {}); // best effort: the reconciler expires abandoned checkouts anyway
  }

  Q.api("GET", "/api/cloud/catalog")
    .then((catalog) => {
      renderCatalog(catalog);
      loading.hidden = true;
      form.hidden = false;
    })
    .catch((err) => {
      loading.hidden = true;
      Q.showError(err);
    });

  Q.onSubmit(form, async (values) => {
    const body = { name: values.name, tier: values.tier, region: values.region };
    if (values.goal) body.goal = values.goal;
    if (values.credentials && Object.keys(values.credentials).length) {
      body.credentials = values.credentials;
    }
    const created = await Q.api("POST", "/api/cloud/instances", body, {
      headers: { "idempotency-key": idempotencyKey },
    });
    if (created.checkout_url) {
      location.assign(created.checkout_url);
    } else {
      location.assign(
        `/cloud/new/provisioning?instance=${encodeURIComponent(created.instance.id)}`
      );
    }
    return new Promise(() => {}); // keep the button busy while the next page loads
  });
})();
