// The server's GPU state in words, from `GET /api/gpuhub/status` (plain functions, no DOM).

export function minutes(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 90) {
    return `${s} s`;
  }
  const m = Math.floor(s / 60);
  if (m < 120) {
    return `${m} min`;
  }
  return `${(s / 3600).toFixed(1)} h`;
}

export function clock(iso) {
  const d = new Date(iso);
  const pad = n => String(n).padStart(2, '0');
  return `${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

export function ordinal(n) {
  const tens = n % 100;
  if (tens >= 11 && tens <= 13) {
    return `${n}th`;
  }
  return `${n}${{ 1: 'st', 2: 'nd', 3: 'rd' }[n % 10] || 'th'}`;
}

function gib(bytes) {
  return (bytes / 1024 ** 3).toFixed(1);
}

// One GPU's live numbers: "GPU 0 35% 2.1/80.0 GB".
export function gpuNumbers(gpu) {
  const parts = [`GPU ${gpu.index === null || gpu.index === undefined ? '' : gpu.index}`.trim()];
  const util = gpu.utilization || {};
  if (typeof util.gpu === 'number') {
    parts.push(`${Math.round(util.gpu)}%`);
  }
  const mem = gpu.memory || {};
  if (typeof mem.used === 'number' && typeof mem.total === 'number' && mem.total > 0) {
    parts.push(`${gib(mem.used)}/${gib(mem.total)} GB`);
  }
  return parts.join(' ');
}

// {text, state, title}: what the status bar shows. `now` in ms.
export function describe(status, now) {
  const notices = (status.service && status.service.notices) || {};
  const gpus = status.gpus || [];
  const progress = notices.give_back;
  if (!gpus.length && progress && progress.status && progress.status !== 'failed') {
    return { text: `GPU again: ${progress.status}…`, state: 'queued', title: progress.reason || '' };
  }
  if (!gpus.length && notices.gpu_turn && notices.gpu_turn.switch_at) {
    const left = (Date.parse(notices.gpu_turn.switch_at) - now) / 1000;
    return {
      text: left > 0 ? `your GPU turn: switching in ${minutes(left)}` : 'switching to the GPU…',
      state: 'warning',
      title: 'Your turn for a GPU has come. Click for "Switch now" or "Not now".'
    };
  }
  if (notices.queue && notices.queue.place) {
    const q = notices.queue;
    const about = typeof q.estimate_s === 'number' ? `, about ${minutes(q.estimate_s)}` : '';
    const later = q.not_before ? `, not before ${clock(q.not_before)}` : '';
    return {
      text: `no GPU · ${ordinal(q.place)} in the queue${about}${later}`,
      state: 'queued',
      title: 'You wait for a GPU; the server runs without one until your turn. Click to leave the queue.'
    };
  }
  if (!gpus.length) {
    if (notices.released && notices.released.at) {
      return {
        text: `given back at ${clock(notices.released.at)}: GPU again?`,
        state: 'released',
        title: `${notices.released.reason || 'The GPU was released.'} Click to get it again.`
      };
    }
    return { text: 'no GPU', state: 'none', title: 'This server has no GPU.' };
  }
  const numbers = gpus.map(gpuNumbers).join(' · ');
  let words;
  let state;
  const busy = gpus.some(g => g.state === 'busy') || status.busy;
  const idle = gpus.every(g => g.state === 'idle');
  if (busy) {
    words = 'busy';
    state = 'busy';
  } else if (idle) {
    const idleFor = Math.min(...gpus.map(g => g.idle_for_s || 0));
    words = `idle for ${minutes(idleFor)}`;
    state = 'idle';
  } else {
    words = gpus.map(g => g.state).join(', ');
    state = 'unknown';
  }
  if (notices.release_at) {
    const left = (Date.parse(notices.release_at) - now) / 1000;
    words += left > 0 ? `, given back in ${minutes(left)}` : ', being given back';
    if (left <= (notices.warn_before_s || 0)) {
      state = 'warning';
    }
  }
  if (notices.keep_until && Date.parse(notices.keep_until) > now) {
    words += ` (kept until ${clock(notices.keep_until)})`;
  }
  const title = [notices.release_reason, ...(notices.warnings || [])].filter(Boolean).join('\n');
  return { text: `${numbers} · ${words}`, state, title };
}
