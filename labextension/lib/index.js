// gpuhub in JupyterLab: the server's GPUs in the status bar, a notification with "Keep it"
// before a release, and "GPU again" after one. It talks only to this server's own
// `/api/gpuhub/` endpoints (the user's Jupyter login); the server relays requests to the gpuhub
// service in its report, with the server's own token.

import { Notification } from '@jupyterlab/apputils';
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { IStatusBar } from '@jupyterlab/statusbar';
import { Widget } from '@lumino/widgets';

import { clock, describe, minutes } from './words';

const POLL_MS = 5000;

async function api(path, init = {}) {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'api/gpuhub', path);
  const response = await ServerConnection.makeRequest(url, init, settings);
  const text = await response.text();
  const data = text ? JSON.parse(text) : {};
  if (!response.ok) {
    throw new Error(data.message || `${response.status} ${response.statusText}`);
  }
  return data;
}

function ask(request) {
  return api('requests', { method: 'POST', body: JSON.stringify(request) });
}

class GpuStatus extends Widget {
  constructor() {
    super();
    this.addClass('gpuhub-status');
    this.node.setAttribute('data-gpuhub', 'status');
    this.node.textContent = 'GPU …';
    this.status = null;
    this.warned = null;
    this.node.addEventListener('click', () => this.clicked());
  }

  async refresh() {
    try {
      this.status = await api('status');
    } catch (e) {
      this.node.textContent = this.pending ? `GPU again: ${this.pending}` : 'GPU: server unreachable';
      return;
    }
    if ((this.status.gpus || []).length) {
      this.pending = null;
    }
    const now = Date.now();
    const shown = describe(this.status, now);
    this.node.textContent = shown.text;
    this.node.title = shown.title;
    this.node.setAttribute('data-state', shown.state);
    this.maybeWarn(now);
    this.maybeOfferTurn(now);
  }

  // A server running on CPU while it waits for its GPU: its turn has come, the switch follows.
  maybeOfferTurn(now) {
    const notices = (this.status.service && this.status.service.notices) || {};
    const turn = notices.gpu_turn;
    if (!turn || !turn.switch_at || this.offered === turn.switch_at) {
      return;
    }
    this.offered = turn.switch_at;
    const left = (Date.parse(turn.switch_at) - now) / 1000;
    Notification.info(
      `Your turn for a GPU has come: the server restarts with it at ${clock(turn.switch_at)} ` +
        `(in ${minutes(left)}). Your variables are saved and come back.`,
      {
        autoClose: false,
        actions: [
          {
            label: 'Switch now',
            caption: 'Save the variables and restart with the GPU now',
            callback: () => this.request({ kind: 'switch-now' })
          },
          {
            label: 'Not now',
            caption: 'Let the GPU go to the next in line; keep your place for the next one',
            callback: () => this.request({ kind: 'not-now' })
          }
        ]
      }
    );
  }

  maybeWarn(now) {
    const notices = (this.status.service && this.status.service.notices) || {};
    const at = notices.release_at;
    if (!at) {
      return;
    }
    const left = (Date.parse(at) - now) / 1000;
    if (left > (notices.warn_before_s || 0) || this.warned === at) {
      return;
    }
    this.warned = at;
    const keep = notices.keep || {};
    const actions = [];
    if (keep.allowed) {
      for (const hours of [1, 4]) {
        if (hours * 3600 <= keep.max_s) {
          actions.push({
            label: `Keep it for ${hours} h`,
            caption: `Postpone the release by ${hours} h`,
            callback: () => this.request({ kind: 'keep', seconds: hours * 3600 })
          });
        }
      }
    }
    actions.push({
      label: 'Give it back now',
      caption: 'Save the variables and restart without the GPU now',
      displayType: 'warn',
      callback: () => this.request({ kind: 'release' })
    });
    const why = keep.allowed ? '' : keep.refused ? ` ${keep.refused}` : '';
    Notification.warning(
      `Your GPU goes back to the pool at ${clock(at)} (in ${minutes(left)}): ` +
        `${notices.release_reason || 'it is idle'}. Your variables are saved first.${why}`,
      { autoClose: false, actions }
    );
  }

  async request(body) {
    const id = Notification.emit('Asking the gpuhub service…', 'in-progress', {
      autoClose: false
    });
    try {
      const result = await ask(body);
      Notification.update({
        id,
        message: result.message || 'Done.',
        type: result.ok ? 'success' : 'error',
        autoClose: 8000
      });
      if (result.ok && (body.kind === 'gpu-again' || body.kind === 'switch-now')) {
        this.pending = 'restarting with the GPU…';
      }
    } catch (e) {
      Notification.update({ id, message: `${e.message}`, type: 'error', autoClose: 8000 });
    }
    this.warned = null;
    if (body.kind === 'not-now') {
      this.offered = null;
    }
    await this.refresh();
  }

  clicked() {
    const notices = (this.status && this.status.service && this.status.service.notices) || {};
    if (this.status && !(this.status.gpus || []).length && notices.gpu_turn) {
      this.offered = null;
      this.maybeOfferTurn(Date.now());
      return;
    }
    if (this.status && !(this.status.gpus || []).length && notices.queue && notices.queue.place) {
      Notification.info('You wait for a GPU while the server runs without one.', {
        autoClose: false,
        actions: [
          {
            label: 'Leave the queue',
            caption: 'Keep running without a GPU and stop waiting for one',
            displayType: 'warn',
            callback: () => this.request({ kind: 'leave-queue' })
          }
        ]
      });
      return;
    }
    if (this.status && !(this.status.gpus || []).length && notices.released) {
      Notification.info('Get the GPU again? The server restarts with it; your variables come back.', {
        autoClose: false,
        actions: [
          {
            label: 'GPU again',
            callback: () => this.request({ kind: 'gpu-again' })
          }
        ]
      });
    }
  }
}

const plugin = {
  id: '@gpuhub/labextension:status',
  description: "The server's GPU in the status bar, warnings before a release, keep it or get it back",
  autoStart: true,
  optional: [IStatusBar],
  activate: (app, statusBar) => {
    const item = new GpuStatus();
    if (statusBar) {
      statusBar.registerStatusItem('@gpuhub/labextension:status', {
        item,
        align: 'left',
        rank: 100
      });
    }
    void item.refresh();
    setInterval(() => void item.refresh(), POLL_MS);
  }
};

export default plugin;
