"""report.html's look: its CSS, the colours of the error kinds, and the script that sorts
the per-image table (the page reads fine without it)."""

FP_COLOUR, FN_COLOUR, EVEN_COLOUR = "#d95f02", "#7570b3", "#777"
CSS = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1320px;color:#222;
line-height:1.35}h1{margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse}td,th{padding:2px 9px;text-align:left;border-bottom:1px solid #e4e4e4}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}.kv th{font-weight:600;color:#444}
.lead{font-size:1.1em;color:#333}.cols{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start}
.grid{display:flex;flex-wrap:wrap;gap:10px}.card{width:200px;font-size:12px}
.card img{width:200px;height:160px;object-fit:contain;display:block;border:1px solid #ccc;background:#eee}
.bad{color:#b00}.flag{background:#fde0dc}.key{display:inline-block;width:1.6em;height:.5em;
vertical-align:middle;margin:0 .3em}#images th{cursor:pointer;position:sticky;top:0;
background:#f4f4f4;white-space:nowrap}#images th[aria-sort=ascending]::after{content:" \\25B2"}
#images th[aria-sort=descending]::after{content:" \\25BC"}#images{font-size:13px}
.tablewrap{max-height:80vh;overflow:auto;border:1px solid #ddd}"""
# Sorts the per-image table on a header click (numbers by data-v, blanks last either way);
# `report.html#sort=dice:desc` sorts on load (a link can point at the worst cases).
SCRIPT = """(function(){var t=document.getElementById('images');if(!t)return;
var hs=Array.prototype.slice.call(t.tHead.rows[0].cells),b=t.tBodies[0];
function val(r,i,num){var c=r.cells[i],v=c.getAttribute('data-v');if(v===null)v=c.textContent;
return num?(v===''?NaN:parseFloat(v)):v.toLowerCase();}
function sortBy(i,desc){var num=hs[i].classList.contains('n'),rows=Array.prototype.slice.call(b.rows);
var keyed=rows.map(function(r,k){return[val(r,i,num),k,r];});
keyed.sort(function(x,y){var a=x[0],c=y[0];if(num){var na=isNaN(a),nc=isNaN(c);
if(na||nc)return na===nc?x[1]-y[1]:(na?1:-1);if(a!==c)return desc?c-a:a-c;return x[1]-y[1];}
if(a!==c)return(desc?a<c:a>c)?1:-1;return x[1]-y[1];});
var f=document.createDocumentFragment();keyed.forEach(function(k){f.appendChild(k[2]);});
b.appendChild(f);hs.forEach(function(h){h.removeAttribute('aria-sort');});
hs[i].setAttribute('aria-sort',desc?'descending':'ascending');}
hs.forEach(function(h,i){h.addEventListener('click',function(){
sortBy(i,h.getAttribute('aria-sort')==='ascending');});});
var m=/sort=([\\w-]+)(?::(asc|desc))?/.exec(location.hash);if(m){hs.forEach(function(h,i){
if(h.getAttribute('data-key')===m[1])sortBy(i,m[2]==='desc');});}})();"""
