# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto"];
if size :over 500 {
  fileinto "yes";
} else {
  fileinto "no";
}
